//! The node socket's messages (`docs/PROTOCOL.md`, "The node socket"): how the container
//! runtime's side (the CNI plugin on a Kubernetes node; the lab in tests) hands a new pod's
//! network namespace to the node's ztunnel *before* the pod's containers start, so that the
//! pod's very first connection is captured. The plugin waits for the answer: if ztunnel does
//! not answer `ok`, the pod does not start (fail closed).
//!
//! One request per connection on a Unix stream socket, one JSON object per line each way.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where ztunnel listens on a node unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/weft/ztunnel.sock";

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum NodeRequest {
    /// A pod was created: capture it if it belongs to the mesh. Answered once its capture
    /// rules and listeners are in place (or it is known not to be enrolled).
    Add(PodRef),
    /// A pod is being deleted: release it.
    Del(PodRef),
}

/// A pod as the runtime knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// The pod's network namespace, as a path ztunnel can open (`/proc/<pid>/ns/net`,
    /// `/var/run/netns/<name>`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    /// The pod's addresses, if the runtime already knows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeResponse {
    /// `true`: the pod may start (captured, or not part of the mesh).
    pub ok: bool,
    /// What happened, for the runtime's log: `captured`, `not enrolled`, `released`, or why
    /// the request failed.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let add: NodeRequest = serde_json::from_str(
            r#"{"op":"add","namespace":"shop","name":"web-0","netns":"/proc/42/ns/net","ips":["10.244.1.5"]}"#,
        )
        .unwrap();
        let NodeRequest::Add(pod) = &add else { panic!() };
        assert_eq!((pod.namespace.as_str(), pod.netns.as_str()), ("shop", "/proc/42/ns/net"));
        let del: NodeRequest = serde_json::from_str(r#"{"op":"del","namespace":"shop","name":"web-0"}"#).unwrap();
        assert!(matches!(del, NodeRequest::Del(_)));
        assert!(serde_json::from_str::<NodeRequest>(r#"{"op":"add","namespace":"a","name":"b","colour":1}"#).is_err());
        let back: NodeRequest = serde_json::from_str(&serde_json::to_string(&add).unwrap()).unwrap();
        assert_eq!(back, add);
    }
}
