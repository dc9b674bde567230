//! Putting the plugin in place on a node, and taking it out: what the ztunnel DaemonSet's init
//! step runs with the host's CNI directories mounted.
//!
//! `install` copies this binary into the CNI bin directory, then appends a
//! `{"type": "weft-cni", ...}` entry to the `plugins` of the network configuration the runtime
//! uses: the first file of the conf directory, in byte order of names, ending `.conf`,
//! `.conflist` or `.json` (how libcni, containerd and CRI-O choose). A single plugin's
//! configuration (a `.conf`) is turned into a list as libcni does it (`ConfListFromConf`) and
//! written as `<name>.conflist` in place of the original. Running it again changes nothing;
//! with other settings it replaces the entry. `uninstall` removes the entry from every
//! configuration in the directory (a converted `.conf` stays a list, which behaves the same)
//! and then the binary.
//!
//! Order matters: the binary is in place before any configuration names it, and the
//! configurations stop naming it before it goes, so the runtime never runs a plugin that is
//! not there. Every file is written under a temporary name that the runtime does not read
//! (`.tmp`) and renamed into place, so the runtime never reads half a file.
//!
//! The editing itself ([`with_entry`], [`without_entry`], [`primary`]) is pure, on JSON values.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::PLUGIN_TYPE;
use crate::plugin::SUPPORTED_VERSIONS;

/// The extensions of the files a runtime reads as network configurations.
pub const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// The host's CNI directories, as mounted where `install`/`uninstall` run.
#[derive(Debug, Clone, clap::Args)]
pub struct Dirs {
    /// Where the runtime finds plugin binaries (the host's /opt/cni/bin, mounted).
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the runtime reads network configurations (the host's /etc/cni/net.d, mounted).
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

/// What `install` writes into the plugin's entry. A setting left out is left out of the entry
/// too, so the plugin's own default applies.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    pub dirs: Dirs,
    /// ztunnel's node socket as the host sees it (ztunnel's --node-socket), written as
    /// `nodeSocket`; the plugin's default is /var/run/weft/ztunnel.sock.
    #[arg(long, env = "WEFT_NODE_SOCKET")]
    pub node_socket: Option<PathBuf>,
    /// How long the plugin waits for ztunnel, written as `timeoutSeconds`; the plugin's
    /// default is 30.
    #[arg(long, env = "WEFT_CNI_TIMEOUT_SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_seconds: Option<u64>,
    /// The namespaces whose pods start without asking ztunnel, comma-separated, written as
    /// `excludeNamespaces`; replaces the plugin's default, kube-system and weft-system (name
    /// the namespace Weft runs in).
    #[arg(long, env = "WEFT_CNI_EXCLUDE_NAMESPACES", value_delimiter = ',')]
    pub exclude_namespaces: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "no network configuration (*.conf, *.conflist, *.json) in {}: the node's network plugin has not written one yet; \
         weft-cni chains after it, so install must run again once it has", dir.display()
    )]
    NoConfig { dir: PathBuf },
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{} is not JSON: {error}", path.display())]
    Parse { path: PathBuf, error: serde_json::Error },
    #[error("{}: {error}", path.display())]
    Conf { path: PathBuf, error: ConfError },
    #[error("--node-socket {} must be an absolute path (the path on the host)", path.display())]
    NodeSocket { path: PathBuf },
    #[error(
        "wrote {} but the runtime would read {} first: rename one of them so that weft-cni's file comes first",
        written.display(), first.display()
    )]
    Shadowed { written: PathBuf, first: PathBuf },
}

/// Why a network configuration cannot take the plugin's entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("neither a configuration list (a `plugins` array of objects) nor a plugin's configuration (a `type`)")]
    Unknown,
    #[error("a plugin's configuration without a `name` or `cniVersion` cannot become a list")]
    Unnamed,
    #[error(
        "its cniVersion {0:?} is not one weft-cni supports ({supported}): every pod's ADD would fail",
        supported = SUPPORTED_VERSIONS.join(", ")
    )]
    Version(String),
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    /// The configuration that now has the entry.
    pub config: PathBuf,
    /// Whether it was rewritten (`false`: the entry was there, as asked).
    pub changed: bool,
    /// The single plugin's configuration it replaced, if one was turned into a list.
    pub converted: Option<PathBuf>,
}

impl std::fmt::Display for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "installed {}", self.binary.display())?;
        match (&self.converted, self.changed) {
            (Some(from), _) => write!(f, "turned {} into {} with weft-cni last", from.display(), self.config.display()),
            (None, true) => write!(f, "added weft-cni at the end of the plugins of {}", self.config.display()),
            (None, false) => write!(f, "{} already ends with weft-cni: unchanged", self.config.display()),
        }
    }
}

/// What `uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uninstalled {
    /// The configurations the entry was removed from.
    pub configs: Vec<PathBuf>,
    /// The binary, if there was one to remove.
    pub binary: Option<PathBuf>,
}

impl std::fmt::Display for Uninstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.configs {
            writeln!(f, "removed weft-cni from {}", c.display())?;
        }
        match &self.binary {
            Some(b) => write!(f, "removed {}", b.display()),
            None => write!(f, "no weft-cni binary to remove"),
        }
    }
}

/// The plugin's entry for a configuration list.
pub fn entry(settings: &Settings) -> Value {
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    if let Some(socket) = &settings.node_socket {
        entry.insert("nodeSocket".into(), socket.to_string_lossy().into_owned().into());
    }
    if let Some(seconds) = settings.timeout_seconds {
        entry.insert("timeoutSeconds".into(), seconds.into());
    }
    if let Some(namespaces) = &settings.exclude_namespaces {
        entry.insert("excludeNamespaces".into(), namespaces.clone().into());
    }
    Value::Object(entry)
}

/// `conf` with `entry` as the last of its plugins and no other entry of the plugin. A
/// configuration list keeps everything else as it is; a single plugin's configuration becomes
/// a list of itself and the entry.
pub fn with_entry(conf: &Value, entry: &Value) -> Result<Value, ConfError> {
    let version = conf.get("cniVersion").and_then(Value::as_str);
    if let Some(v) = version.filter(|v| !SUPPORTED_VERSIONS.contains(v)) {
        return Err(ConfError::Version(v.to_owned()));
    }
    match conf.get("plugins") {
        Some(Value::Array(plugins)) if plugins.iter().all(Value::is_object) => {
            let mut plugins: Vec<Value> = plugins.iter().filter(|p| !is_entry(p)).cloned().collect();
            plugins.push(entry.clone());
            let mut list = conf.clone();
            list["plugins"] = Value::Array(plugins);
            Ok(list)
        }
        Some(_) => Err(ConfError::Unknown),
        None if conf.get("type").is_some_and(Value::is_string) => {
            let name = conf.get("name").filter(|n| n.is_string()).ok_or(ConfError::Unnamed)?;
            let version = version.ok_or(ConfError::Unnamed)?;
            Ok(json!({"cniVersion": version, "name": name, "plugins": [conf, entry]}))
        }
        None => Err(ConfError::Unknown),
    }
}

/// `conf` without the plugin's entries, or `None` if it has none.
pub fn without_entry(conf: &Value) -> Option<Value> {
    let plugins = conf.get("plugins")?.as_array()?;
    if !plugins.iter().any(is_entry) {
        return None;
    }
    let mut list = conf.clone();
    list["plugins"] = Value::Array(plugins.iter().filter(|p| !is_entry(p)).cloned().collect());
    Some(list)
}

/// The configuration file a runtime uses among `names`: the first, in byte order, with a
/// configuration's extension.
pub fn primary<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names.into_iter().filter(|n| is_conf_name(n)).min()
}

/// Copies this binary into the bin directory, then adds the entry to the runtime's
/// configuration.
pub fn install(settings: &Settings) -> Result<Installed, InstallError> {
    if let Some(path) = settings.node_socket.as_ref().filter(|p| !p.is_absolute()) {
        return Err(InstallError::NodeSocket { path: path.clone() });
    }
    let exe = std::env::current_exe().map_err(|error| InstallError::Io { path: "/proc/self/exe".into(), error })?;
    let binary = settings.dirs.cni_bin_dir.join(PLUGIN_TYPE);
    copy_binary(&exe, &binary)?;

    let dir = &settings.dirs.cni_conf_dir;
    let file = primary_file(dir)?.ok_or_else(|| InstallError::NoConfig { dir: dir.clone() })?;
    let conf = read_json(&file)?;
    let new = with_entry(&conf, &entry(settings)).map_err(|error| InstallError::Conf { path: file.clone(), error })?;
    let target = if conf.get("plugins").is_some() { file.clone() } else { file.with_extension("conflist") };
    let changed = new != conf;
    if changed {
        write_atomically(&target, &new, mode(&file)?)?;
    }
    let converted = (target != file).then(|| file.clone());
    if let Some(original) = &converted {
        fs::remove_file(original).map_err(|error| InstallError::Io { path: original.clone(), error })?;
        match primary_file(dir)? {
            Some(first) if first != target => return Err(InstallError::Shadowed { written: target, first }),
            _ => {}
        }
    }
    Ok(Installed { binary, config: target, changed, converted })
}

/// Removes the entry from every configuration in the conf directory, then the binary.
/// Files that are not JSON are left alone (they are not the plugin's to judge).
pub fn uninstall(dirs: &Dirs) -> Result<Uninstalled, InstallError> {
    let mut configs = Vec::new();
    for file in conf_files(&dirs.cni_conf_dir)? {
        let Ok(conf) = read_json(&file) else { continue };
        if let Some(new) = without_entry(&conf) {
            write_atomically(&file, &new, mode(&file)?)?;
            configs.push(file);
        }
    }
    let binary = dirs.cni_bin_dir.join(PLUGIN_TYPE);
    let binary = match fs::remove_file(&binary) {
        Ok(()) => Some(binary),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(InstallError::Io { path: binary, error }),
    };
    Ok(Uninstalled { configs, binary })
}

fn is_entry(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn is_conf_name(name: &str) -> bool {
    Path::new(name).extension().and_then(|e| e.to_str()).is_some_and(|e| CONF_EXTENSIONS.contains(&e))
}

/// The names of the files in `dir` (not directories, as libcni), sorted.
fn file_names(dir: &Path) -> Result<Vec<String>, InstallError> {
    let io = |error| InstallError::Io { path: dir.to_owned(), error };
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io)? {
        let e = e.map_err(io)?;
        if !e.file_type().map_err(io)?.is_dir() {
            names.extend(e.file_name().to_str().map(str::to_owned));
        }
    }
    names.sort();
    Ok(names)
}

/// The configuration files of `dir`, in the order the runtime considers them.
fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    Ok(file_names(dir)?.iter().filter(|n| is_conf_name(n)).map(|n| dir.join(n)).collect())
}

fn primary_file(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(primary(file_names(dir)?.iter().map(String::as_str)).map(|n| dir.join(n)))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let bytes = fs::read(path).map_err(|error| InstallError::Io { path: path.to_owned(), error })?;
    serde_json::from_slice(&bytes).map_err(|error| InstallError::Parse { path: path.to_owned(), error })
}

fn mode(path: &Path) -> Result<u32, InstallError> {
    let meta = fs::metadata(path).map_err(|error| InstallError::Io { path: path.to_owned(), error })?;
    Ok(meta.permissions().mode() & 0o7777)
}

/// Writes `path` through a temporary file in the same directory, renamed into place.
fn write_atomically(path: &Path, value: &Value, mode: u32) -> Result<(), InstallError> {
    // Serializing a JSON value cannot fail.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    replace(path, mode, |file| file.write_all(text.as_bytes()))
}

fn copy_binary(from: &Path, to: &Path) -> Result<(), InstallError> {
    replace(to, 0o755, |file| {
        let mut source = fs::File::open(from)?;
        std::io::copy(&mut source, file).map(drop)
    })
    .map_err(|e| match e {
        InstallError::Io { path, error } => InstallError::Io {
            path,
            error: std::io::Error::new(error.kind(), format!("copying {}: {error}", from.display())),
        },
        other => other,
    })
}

/// Writes a new file next to `path` (named `.weft-cni-<pid>.tmp`: no runtime reads it), syncs
/// it and renames it over `path`.
fn replace(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{PLUGIN_TYPE}-{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        fill(&mut file)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|error| {
        let _ = fs::remove_file(&tmp);
        InstallError::Io { path: path.to_owned(), error }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(socket: Option<&str>) -> Settings {
        Settings {
            dirs: Dirs { cni_bin_dir: "/b".into(), cni_conf_dir: "/c".into() },
            node_socket: socket.map(PathBuf::from),
            timeout_seconds: None,
            exclude_namespaces: None,
        }
    }

    fn calico() -> Value {
        json!({
            "name": "k8s-pod-network", "cniVersion": "1.0.0",
            "plugins": [
                {"type": "calico", "ipam": {"type": "calico-ipam"}, "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}},
                {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
            ],
        })
    }

    #[test]
    fn the_entry_goes_last_and_nothing_else_changes() {
        let e = entry(&settings(Some("/run/weft/ztunnel.sock")));
        assert_eq!(e, json!({"type": "weft-cni", "nodeSocket": "/run/weft/ztunnel.sock"}));
        let once = with_entry(&calico(), &e).unwrap();
        let mut expected = calico();
        expected["plugins"].as_array_mut().unwrap().push(e.clone());
        assert_eq!(once, expected);
        // Idempotent: a second install is the same configuration.
        assert_eq!(with_entry(&once, &e).unwrap(), once);
        // Other settings replace the entry, still last.
        let other = entry(&settings(None));
        let replaced = with_entry(&once, &other).unwrap();
        assert_eq!(replaced["plugins"].as_array().unwrap().len(), 4);
        assert_eq!(replaced["plugins"][3], json!({"type": "weft-cni"}));
    }

    #[test]
    fn an_entry_not_last_is_moved_last() {
        let e = entry(&settings(None));
        let mut conf = calico();
        conf["plugins"].as_array_mut().unwrap().insert(1, e.clone());
        let fixed = with_entry(&conf, &e).unwrap();
        let types: Vec<&str> =
            fixed["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["calico", "bandwidth", "portmap", "weft-cni"]);
    }

    #[test]
    fn a_single_plugin_configuration_becomes_a_list() {
        let bridge = json!({
            "cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0", "isGateway": true,
            "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"},
        });
        let e = entry(&settings(None));
        let list = with_entry(&bridge, &e).unwrap();
        assert_eq!(list, json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [bridge, e]}));
        assert_eq!(without_entry(&list).unwrap(), json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [bridge]}));
    }

    #[test]
    fn removal_leaves_the_rest_as_it_was() {
        let e = entry(&settings(None));
        assert_eq!(without_entry(&with_entry(&calico(), &e).unwrap()).unwrap(), calico());
        assert_eq!(without_entry(&calico()), None);
        assert_eq!(without_entry(&json!({"type": "bridge"})), None);
    }

    #[test]
    fn configurations_it_cannot_extend_are_refused() {
        let e = entry(&settings(None));
        assert_eq!(with_entry(&json!({"cniVersion": "1.0.0", "name": "n"}), &e), Err(ConfError::Unknown));
        assert_eq!(with_entry(&json!({"cniVersion": "1.0.0", "plugins": {"type": "x"}}), &e), Err(ConfError::Unknown));
        assert_eq!(with_entry(&json!({"cniVersion": "1.0.0", "type": "bridge"}), &e), Err(ConfError::Unnamed));
        let old = json!({"cniVersion": "0.2.0", "name": "n", "type": "bridge"});
        assert_eq!(with_entry(&old, &e), Err(ConfError::Version("0.2.0".into())));
    }

    #[test]
    fn the_runtime_reads_the_first_name_in_byte_order() {
        let names = ["99-loopback.conf", "10-calico.conflist", "README", "05-cilium.json", "00-old.conf.bak"];
        assert_eq!(primary(names), Some("05-cilium.json"));
        assert_eq!(primary(["10-flannel.conflist", "10-flannel.conf"]), Some("10-flannel.conf"));
        assert_eq!(primary(["README.md"]), None);
    }
}
