//! The CNI commands, as the CNI specification (1.1.0) defines the contract: the command and
//! the attachment in environment variables, the network configuration as JSON on stdin, a
//! result on stdout, and on failure the error object on stdout with a non-zero exit.
//!
//! | command | what weft-cni does |
//! | --- | --- |
//! | `ADD` | hands the pod (`K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS`, `CNI_NETNS`, the addresses of `prevResult`) to ztunnel and prints `prevResult` once ztunnel answers `ok`; anything else is an error and the pod does not start (fail closed) |
//! | `DEL` | tells ztunnel the pod is gone; best-effort, as the spec asks: it succeeds even when ztunnel cannot be reached (ztunnel also releases a pod when the controller reports it gone) |
//! | `CHECK` | verifies that ztunnel accepts connections on the node socket (the node socket has no query for one pod's state) |
//! | `STATUS` | succeeds without asking ztunnel: a runtime that calls STATUS reports the node's network not ready when it fails, which takes the whole node out of service for every pod, while a failed ADD only holds back the pods starting while ztunnel is away |
//! | `GC` | succeeds: the plugin keeps no state of its own |
//! | `VERSION` | prints the supported versions |
//!
//! A sandbox that is not a Kubernetes pod (no `K8S_POD_*` arguments) passes through untouched:
//! only pods can be in the mesh. So do the pods of the excluded namespaces
//! (`excludeNamespaces`, [`DEFAULT_EXCLUDED_NAMESPACES`]): the ones the mesh itself and the
//! cluster depend on, whose pods must start when ztunnel cannot answer for them (the
//! controller's own pods after a full restart: ztunnel answers only for pods the controller
//! has reported). For every other pod, whether it is enrolled is ztunnel's decision (it
//! answers `not enrolled`), never the plugin's.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshapi::node::{NodeRequest, PodRef};
use serde_json::{Map, Value, json};

use crate::error::{CniError, Code};
use crate::node_socket::{self, CallError};

/// The protocol versions the plugin speaks, oldest first: every version with chaining
/// (`prevResult` came in 0.3.0). The plugin passes the previous result through as it is, so
/// the result format of each is the runtime's and the previous plugin's business.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version: the one reported when the configuration does not say.
pub const LATEST_VERSION: &str = "1.1.0";

/// How long ADD, DEL and CHECK wait for ztunnel (`timeoutSeconds`). 30 s: ztunnel waits up to
/// its `--pod-wait` (10 s by default) for the controller to report a new pod before it
/// captures or refuses it, and its own answer (with its reason) is worth more than ours;
/// well inside the 2 minutes the kubelet gives the runtime to create a pod sandbox.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The namespaces whose pods start without asking ztunnel unless `excludeNamespaces` says
/// otherwise: `weft-system`, where the controller runs (ztunnel refuses pods the controller has
/// not reported, so the controller's own pods could never start again after it stopped), and
/// `kube-system`, which the cluster needs to work at all (DNS, the network plugin's agents),
/// as Istio's CNI plugin excludes it by default. Neither is meant to be in the mesh.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system", "weft-system"];

/// The environment variables the plugin reads.
pub const ENV_VARS: &[&str] = &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(value: &str) -> Option<Command> {
        Some(match value {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// The environment variables the spec requires for the command. `CNI_PATH`, required by
    /// the spec for GC, is not: the plugin delegates to no other plugin.
    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Status | Command::Gc | Command::Version => &[],
        }
    }

    /// The oldest protocol version that has the command.
    fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Status | Command::Gc => "1.1.0",
            Command::Add | Command::Del | Command::Version => "0.3.0",
        }
    }
}

/// The plugin's environment: the `CNI_*` variables that are set, not empty and valid UTF-8.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
}

impl Environment {
    pub fn from_process() -> Self {
        Self::from_pairs(ENV_VARS.iter().filter_map(|name| Some((*name, std::env::var(name).ok()?))))
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> Self {
        let vars = pairs.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_owned(), v)).collect();
        Environment { vars }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

/// What the plugin prints on stdout, and whether it exits with success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub stdout: String,
    pub success: bool,
}

/// Runs one command: reads the environment and stdin, returns what to print.
pub fn run(env: &Environment, stdin: &mut dyn Read) -> Reply {
    let mut version = LATEST_VERSION.to_owned();
    match execute(env, stdin, &mut version) {
        Ok(None) => Reply { stdout: String::new(), success: true },
        Ok(Some(result)) => Reply { stdout: format!("{result}\n"), success: true },
        Err(e) => {
            log(&format!("{}: {e}", env.var("CNI_COMMAND").unwrap_or("(no CNI_COMMAND)")));
            Reply { stdout: format!("{}\n", e.to_json(&version)), success: false }
        }
    }
}

/// The plugin's configuration: the keys of the network configuration it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub cni_version: String,
    pub name: String,
    /// `nodeSocket`: where ztunnel listens (its `--node-socket`); `meshapi::node::DEFAULT_SOCKET`
    /// unless set.
    pub node_socket: PathBuf,
    /// `timeoutSeconds`: how long to wait for ztunnel; [`DEFAULT_TIMEOUT`] unless set.
    pub timeout: Duration,
    /// `excludeNamespaces`: the namespaces whose pods pass through without asking ztunnel;
    /// [`DEFAULT_EXCLUDED_NAMESPACES`] unless set (a list given replaces it).
    pub exclude_namespaces: Vec<String>,
    /// `prevResult`: the result of the plugins before this one.
    pub prev_result: Option<Map<String, Value>>,
}

impl Config {
    /// Reads the configuration from a JSON object: a field of the wrong type or value is an
    /// invalid configuration (7) that names it, an unsupported `cniVersion` an incompatible
    /// version (1). Other keys are the other plugins' and the runtime's, and ignored.
    pub fn from_json(conf: &Map<String, Value>) -> Result<Config, CniError> {
        let invalid = |details: String| CniError::new(Code::InvalidConfig, "invalid network configuration", details);
        let string = |key: &str| match conf.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(format!("{key} must be a string, not {other}"))),
        };
        let cni_version = string("cniVersion")?.ok_or_else(|| invalid("cniVersion is missing".into()))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI versions",
                format!(
                    "the configuration's cniVersion is {cni_version:?}; weft-cni supports {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = string("name")?.filter(|n| !n.is_empty()).ok_or_else(|| invalid("name is missing".into()))?;
        let node_socket = match string("nodeSocket")? {
            None => PathBuf::from(meshapi::node::DEFAULT_SOCKET),
            Some(path) if path.starts_with('/') => PathBuf::from(path),
            Some(path) => {
                return Err(invalid(format!("nodeSocket {path:?} must be an absolute path (ztunnel's --node-socket)")));
            }
        };
        let timeout = match conf.get("timeoutSeconds") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(value) => match value.as_u64() {
                Some(seconds) if seconds > 0 => Duration::from_secs(seconds),
                _ => {
                    return Err(invalid(format!(
                        "timeoutSeconds {value} must be a whole number of seconds, at least 1"
                    )));
                }
            },
        };
        let exclude_namespaces = match conf.get("excludeNamespaces") {
            None | Some(Value::Null) => DEFAULT_EXCLUDED_NAMESPACES.iter().map(|n| n.to_string()).collect(),
            Some(Value::Array(names)) if names.iter().all(Value::is_string) => {
                names.iter().filter_map(Value::as_str).map(str::to_owned).collect()
            }
            Some(other) => {
                return Err(invalid(format!("excludeNamespaces must be an array of namespace names, not {other}")));
            }
        };
        let prev_result = match conf.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(Value::Object(result)) => Some(result.clone()),
            Some(other) => return Err(invalid(format!("prevResult must be an object, not {other}"))),
        };
        Ok(Config { cni_version, name, node_socket, timeout, exclude_namespaces, prev_result })
    }
}

/// The Kubernetes pod a sandbox belongs to, from `CNI_ARGS`; `None` when the sandbox is not
/// a pod's (no `K8S_POD_*` arguments).
pub fn kubernetes_pod(cni_args: Option<&str>) -> Result<Option<(String, String)>, CniError> {
    let invalid = |details: String| CniError::new(Code::InvalidEnvironment, "invalid CNI_ARGS", details);
    let (mut namespace, mut name) = (None, None);
    for pair in cni_args.unwrap_or("").split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("{pair:?} is not KEY=VALUE (pairs separated by ';')")))?;
        match key {
            "K8S_POD_NAMESPACE" if !value.is_empty() => namespace = Some(value.to_owned()),
            "K8S_POD_NAME" if !value.is_empty() => name = Some(value.to_owned()),
            _ => {}
        }
    }
    match (namespace, name) {
        (Some(namespace), Some(name)) => Ok(Some((namespace, name))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid("K8S_POD_NAMESPACE is set but K8S_POD_NAME is not".into())),
        (None, Some(_)) => Err(invalid("K8S_POD_NAME is set but K8S_POD_NAMESPACE is not".into())),
    }
}

/// The pod's addresses in a result: every `ips[].address` (CIDR notation) except those the
/// result places on a host-side interface (one without a `sandbox`).
pub fn pod_ips(result: &Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let invalid = |details: String| CniError::new(Code::InvalidConfig, "invalid prevResult", details);
    let interfaces = result.get("interfaces").and_then(Value::as_array);
    let on_host = |index: u64| {
        let interface = interfaces.and_then(|all| all.get(usize::try_from(index).ok()?));
        interface.is_some_and(|i| i.get("sandbox").and_then(Value::as_str).is_none_or(str::is_empty))
    };
    let ips = match result.get("ips") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(ips)) => ips,
        Some(other) => return Err(invalid(format!("prevResult.ips must be an array, not {other}"))),
    };
    let mut out = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        if ip.get("interface").and_then(Value::as_u64).is_some_and(on_host) {
            continue;
        }
        let address = ip.get("address").and_then(Value::as_str).unwrap_or_default();
        let parsed = address.split_once('/').and_then(|(addr, prefix)| {
            prefix.parse::<u8>().ok()?;
            addr.parse::<IpAddr>().ok()
        });
        let parsed = parsed.ok_or_else(|| {
            invalid(format!("prevResult.ips[{i}].address {address:?} is not an address in CIDR notation"))
        })?;
        out.push(parsed);
    }
    Ok(out)
}

/// Runs the command; sets `version` to the configuration's protocol version as soon as it is
/// known, for the error object.
fn execute(env: &Environment, stdin: &mut dyn Read, version: &mut String) -> Result<Option<Value>, CniError> {
    let invalid_env = |msg: &str, details: String| CniError::new(Code::InvalidEnvironment, msg, details);
    let command = match env.var("CNI_COMMAND") {
        None => {
            return Err(invalid_env(
                "required environment variables missing: CNI_COMMAND",
                "weft-cni is a CNI plugin, run by the container runtime with CNI_COMMAND set; \
                 `weft-cni install --help` tells how to install it"
                    .into(),
            ));
        }
        Some(value) => Command::parse(value).ok_or_else(|| {
            invalid_env(
                &format!("unknown CNI_COMMAND: {value}"),
                "CNI_COMMAND must be one of ADD, DEL, CHECK, STATUS, GC, VERSION".into(),
            )
        })?,
    };
    let missing: Vec<&str> = command.required().iter().copied().filter(|name| env.var(name).is_none()).collect();
    if !missing.is_empty() {
        return Err(invalid_env(
            &format!("required environment variables missing: {}", missing.join(", ")),
            format!("the container runtime must set them for {}", env.var("CNI_COMMAND").unwrap_or_default()),
        ));
    }
    let mut input = Vec::new();
    stdin
        .read_to_end(&mut input)
        .map_err(|e| CniError::new(Code::Io, "cannot read the network configuration from stdin", e.to_string()))?;

    if command == Command::Version {
        let asked = serde_json::from_slice::<Value>(&input).ok();
        let asked = asked.as_ref().and_then(|v| v.get("cniVersion")).and_then(Value::as_str).unwrap_or(LATEST_VERSION);
        return Ok(Some(json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})));
    }

    let conf = match serde_json::from_slice::<Value>(&input) {
        Ok(Value::Object(conf)) => conf,
        Ok(other) => {
            return Err(CniError::new(
                Code::Decoding,
                "cannot decode the network configuration",
                format!("it must be a JSON object, not {other}"),
            ));
        }
        Err(e) => {
            return Err(CniError::new(Code::Decoding, "cannot decode the network configuration", e.to_string()));
        }
    };
    if let Some(v) = conf.get("cniVersion").and_then(Value::as_str).filter(|v| SUPPORTED_VERSIONS.contains(v)) {
        *version = v.to_owned();
    }
    let config = Config::from_json(&conf)?;
    if position(&config.cni_version) < position(command.since()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "incompatible CNI versions",
            format!(
                "{} needs cniVersion {} or later, not {}",
                env.var("CNI_COMMAND").unwrap_or_default(),
                command.since(),
                config.cni_version
            ),
        ));
    }

    let container = env.var("CNI_CONTAINERID").unwrap_or_default();
    match command {
        Command::Add => add(env, &config, container).map(Some),
        Command::Del => del(env, &config, container).map(|()| None),
        Command::Check => check(env, &config).map(|()| None),
        Command::Status | Command::Gc | Command::Version => Ok(None),
    }
}

fn add(env: &Environment, config: &Config, container: &str) -> Result<Value, CniError> {
    let Some(prev) = &config.prev_result else {
        return Err(CniError::new(
            Code::InvalidConfig,
            "weft-cni is a chained plugin and got no prevResult",
            "put it after the interface plugin (bridge, Calico, Cilium, ...) in the plugins list of a .conflist",
        ));
    };
    let mut result = prev.clone();
    result.entry("cniVersion").or_insert_with(|| Value::String(config.cni_version.clone()));
    let (namespace, name) = match target(env, config)? {
        Target::Pod { namespace, name } => (namespace, name),
        skipped => {
            log(&format!("ADD container {container}: {skipped}: passed through without asking ztunnel"));
            return Ok(Value::Object(result));
        }
    };
    let request = NodeRequest::Add(PodRef {
        namespace: namespace.clone(),
        name: name.clone(),
        netns: env.var("CNI_NETNS").unwrap_or_default().to_owned(),
        ips: pod_ips(prev)?,
    });
    match node_socket::call(&config.node_socket, &request, config.timeout) {
        Ok(answer) if answer.ok => {
            log(&format!("ADD pod {namespace}/{name} (container {container}): ztunnel: {}", answer.message));
            Ok(Value::Object(result))
        }
        Ok(answer) => Err(CniError::new(
            Code::Refused,
            format!("ztunnel refused pod {namespace}/{name}: it must not start"),
            answer.message,
        )),
        Err(e) => Err(CniError::new(
            code(&e),
            format!("cannot hand pod {namespace}/{name} to ztunnel: it must not start until ztunnel takes it"),
            e.to_string(),
        )),
    }
}

fn del(env: &Environment, config: &Config, container: &str) -> Result<(), CniError> {
    let Target::Pod { namespace, name } = target(env, config)? else {
        return Ok(());
    };
    let request = NodeRequest::Del(PodRef {
        namespace: namespace.clone(),
        name: name.clone(),
        netns: String::new(),
        ips: vec![],
    });
    let outcome = match node_socket::call(&config.node_socket, &request, config.timeout) {
        Ok(answer) if answer.ok => format!("ztunnel: {}", answer.message),
        Ok(answer) => format!("ztunnel answered {:?}; ignored (DEL is best-effort)", answer.message),
        Err(e) => {
            format!("{e}; ignored (DEL is best-effort: ztunnel releases the pod when the controller reports it gone)")
        }
    };
    log(&format!("DEL pod {namespace}/{name} (container {container}): {outcome}"));
    Ok(())
}

fn check(env: &Environment, config: &Config) -> Result<(), CniError> {
    let Target::Pod { namespace, name } = target(env, config)? else {
        return Ok(());
    };
    node_socket::probe(&config.node_socket, config.timeout).map_err(|e| {
        CniError::new(
            code(&e),
            format!("ztunnel, which captures pod {namespace}/{name}, is not reachable"),
            e.to_string(),
        )
    })
}

/// Whom a command is about.
enum Target {
    /// A pod ztunnel must answer for.
    Pod { namespace: String, name: String },
    /// A sandbox without `K8S_POD_*` arguments.
    NotAPod,
    /// A pod of an excluded namespace.
    Excluded { namespace: String, name: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pod { namespace, name } => write!(f, "pod {namespace}/{name}"),
            Target::NotAPod => f.write_str("not a Kubernetes pod (no K8S_POD_* in CNI_ARGS)"),
            Target::Excluded { namespace, name } => {
                write!(f, "pod {namespace}/{name}, in an excluded namespace (excludeNamespaces)")
            }
        }
    }
}

fn target(env: &Environment, config: &Config) -> Result<Target, CniError> {
    Ok(match kubernetes_pod(env.var("CNI_ARGS"))? {
        None => Target::NotAPod,
        Some((namespace, name)) if config.exclude_namespaces.contains(&namespace) => {
            Target::Excluded { namespace, name }
        }
        Some((namespace, name)) => Target::Pod { namespace, name },
    })
}

/// The code of a failed call: the runtime retries a pod whose ztunnel was away (11).
fn code(error: &CallError) -> Code {
    if error.is_denied() {
        Code::Io
    } else if error.is_unreachable() {
        Code::TryAgainLater
    } else {
        Code::Decoding
    }
}

fn position(version: &str) -> usize {
    SUPPORTED_VERSIONS.iter().position(|v| *v == version).unwrap_or(0)
}

/// One line on stderr, which the runtime keeps in its log.
fn log(line: &str) {
    eprintln!("weft-cni: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn kubernetes_arguments_name_the_pod() {
        let args =
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u";
        assert_eq!(kubernetes_pod(Some(args)).unwrap(), Some(("shop".into(), "web-0".into())));
        assert_eq!(kubernetes_pod(None).unwrap(), None);
        assert_eq!(kubernetes_pod(Some("FOO=BAR;")).unwrap(), None);
        assert_eq!(kubernetes_pod(Some("K8S_POD_NAME=web-0")).unwrap_err().code, Code::InvalidEnvironment);
        assert_eq!(kubernetes_pod(Some("K8S_POD_NAME")).unwrap_err().code, Code::InvalidEnvironment);
    }

    #[test]
    fn pod_addresses_skip_host_interfaces() {
        let result = object(json!({
            "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/var/run/netns/p"}],
            "ips": [
                {"address": "10.244.1.5/24", "interface": 2},
                {"address": "fd00::5/64", "interface": 2},
                {"address": "10.244.1.1/24", "interface": 0},
                {"address": "10.9.9.9/32"},
            ],
        }));
        let ips: Vec<IpAddr> = ["10.244.1.5", "fd00::5", "10.9.9.9"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(pod_ips(&result).unwrap(), ips);
        assert!(pod_ips(&Map::new()).unwrap().is_empty());
        let bad = object(json!({"ips": [{"address": "10.244.1.5"}]}));
        let e = pod_ips(&bad).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.details.contains("ips[0]"), "{e}");
    }

    #[test]
    fn configuration_defaults_and_errors_name_the_key() {
        let c = Config::from_json(&object(json!({"cniVersion": "1.0.0", "name": "k8s", "type": "weft-cni"}))).unwrap();
        assert_eq!(c.node_socket, PathBuf::from(meshapi::node::DEFAULT_SOCKET));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.exclude_namespaces, ["kube-system", "weft-system"]);
        let c =
            Config::from_json(&object(json!({"cniVersion": "1.0.0", "name": "k8s", "excludeNamespaces": ["infra"]})));
        assert_eq!(c.unwrap().exclude_namespaces, ["infra"], "a list given replaces the default");
        let err = |v: Value| Config::from_json(&object(v)).unwrap_err();
        let e = err(json!({"cniVersion": "1.0.0", "name": "k8s", "timeoutSeconds": "30s"}));
        assert_eq!((e.code, e.details.contains("timeoutSeconds")), (Code::InvalidConfig, true), "{e}");
        let e = err(json!({"cniVersion": "1.0.0", "name": "k8s", "nodeSocket": "ztunnel.sock"}));
        assert_eq!((e.code, e.details.contains("nodeSocket")), (Code::InvalidConfig, true), "{e}");
        let e = err(json!({"cniVersion": "1.0.0", "name": "k8s", "excludeNamespaces": "kube-system"}));
        assert_eq!((e.code, e.details.contains("excludeNamespaces")), (Code::InvalidConfig, true), "{e}");
        assert_eq!(err(json!({"cniVersion": "0.2.0", "name": "k8s"})).code, Code::IncompatibleVersion);
        assert_eq!(err(json!({"name": "k8s"})).code, Code::InvalidConfig);
        assert_eq!(err(json!({"cniVersion": "1.0.0"})).code, Code::InvalidConfig);
    }
}
