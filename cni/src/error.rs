//! The CNI error object (`{"cniVersion", "code", "msg", "details"}`, printed on stdout with a
//! non-zero exit) and the codes this plugin answers with. The runtime shows `msg` and
//! `details` together in the pod's events (`<msg>; <details>`): `msg` says what failed,
//! `details` why and what to check.

use serde_json::{Value, json};

/// The error codes used, the spec's well-known ones (0-99) and one of the plugin's own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: the configuration's `cniVersion` is not one the plugin supports (for this command).
    IncompatibleVersion,
    /// 4: a required environment variable is missing or invalid (`CNI_COMMAND`, `CNI_ARGS`, ...).
    InvalidEnvironment,
    /// 5: reading stdin, or the node socket refused the plugin (not root).
    Io,
    /// 6: stdin, or ztunnel's answer, is not the JSON it must be.
    Decoding,
    /// 7: the configuration is JSON but not a valid configuration (a field's type or value).
    InvalidConfig,
    /// 11: ztunnel is not reachable or did not answer in time; the runtime should retry.
    TryAgainLater,
    /// 100: ztunnel answered and refused the pod (its reason is in `details`).
    Refused,
}

impl Code {
    pub fn number(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::InvalidEnvironment => 4,
            Code::Io => 5,
            Code::Decoding => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::Refused => 100,
        }
    }
}

/// A failed command, as the runtime will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    /// What failed, short.
    pub msg: String,
    /// Why, and what to check.
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The spec's error object, in the protocol version in use.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code.number(), "msg": self.msg, "details": self.details})
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.is_empty() { f.write_str(&self.msg) } else { write!(f, "{}; {}", self.msg, self.details) }
    }
}

impl std::error::Error for CniError {}
