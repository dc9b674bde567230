//! The last applied configuration, kept on the node (static stability): a ztunnel that
//! restarts while the controller is unreachable starts from it instead of serving nothing,
//! and resumes the watch stream from its cursor when the controller returns.
//!
//! The file is `<state-dir>/config.json`:
//!
//! ```json
//! {"cursor": {"epoch": "6f1c..", "version": 42}, "resources": [{"kind": "Workload", "name": .., "spec": ..}, ..]}
//! ```
//!
//! It is written by one task, after each applied message (coalescing a burst into one
//! write), to a temporary file renamed over the old one, so a crash never leaves half a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshapi::watch::Cursor;
use meshapi::{Key, Resource};
use tokio::sync::watch;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("reading the saved configuration {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("the saved configuration {path} is not valid ({error}); starting without it")]
    Invalid { path: PathBuf, error: String },
}

/// What was applied: where the stream stood, and every resource in its wire form.
#[derive(Debug, Default)]
pub struct Applied {
    pub cursor: Cursor,
    pub resources: BTreeMap<Key, String>,
}

impl Applied {
    /// The resources, decoded.
    pub fn decoded(&self) -> Vec<Resource> {
        self.resources
            .values()
            .filter_map(|text| serde_json::from_str(text).ok().and_then(|w| Resource::from_wire(w).ok()))
            .collect()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct File {
    cursor: Cursor,
    resources: Vec<serde_json::Value>,
}

/// Reads the saved configuration; `Ok(None)` if there is none.
pub fn load(path: &Path) -> Result<Option<Applied>, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(PersistError::Read { path: path.to_owned(), error }),
    };
    let file: File = serde_json::from_str(&text)
        .map_err(|e| PersistError::Invalid { path: path.to_owned(), error: e.to_string() })?;
    let mut resources = BTreeMap::new();
    for value in file.resources {
        let wire: meshapi::resource::Wire = serde_json::from_value(value)
            .map_err(|e| PersistError::Invalid { path: path.to_owned(), error: e.to_string() })?;
        let resource = Resource::from_wire(wire)
            .map_err(|e| PersistError::Invalid { path: path.to_owned(), error: e.to_string() })?;
        resources.insert(resource.key(), resource.encode());
    }
    Ok(Some(Applied { cursor: file.cursor, resources }))
}

/// Writes the configuration in the background, the latest version winning.
#[derive(Clone)]
pub struct ConfigFile {
    latest: watch::Sender<Option<String>>,
}

impl ConfigFile {
    /// Starts the writer task for `path`.
    pub fn new(path: PathBuf) -> ConfigFile {
        let (latest, mut rx) = watch::channel::<Option<String>>(None);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(text) = rx.borrow_and_update().clone() else { continue };
                let path = path.clone();
                let written = tokio::task::spawn_blocking(move || write_atomically(&path, text.as_bytes())).await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot save the applied configuration"),
                    Err(e) => warn!(error = %e, "cannot save the applied configuration"),
                }
            }
        });
        ConfigFile { latest }
    }

    /// Saves `resources` at `cursor` (soon, in the background).
    pub fn save(&self, cursor: &Cursor, resources: &BTreeMap<Key, String>) {
        let mut text = String::with_capacity(64 + resources.values().map(|r| r.len() + 1).sum::<usize>());
        text.push_str("{\"cursor\":");
        text.push_str(&serde_json::to_string(cursor).unwrap_or_else(|_| "{}".into()));
        text.push_str(",\"resources\":[");
        for (i, r) in resources.values().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(r);
        }
        text.push_str("]}\n");
        self.latest.send_replace(Some(text));
    }
}

/// Writes `bytes` to a temporary file beside `path` (mode 0600) and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saved_configuration_loads_back() {
        let dir = std::env::temp_dir().join(format!("weft-persist-{}", std::process::id()));
        let path = dir.join("config.json");
        let snapshot = meshapi::Snapshot::from_yaml(
            "workloads: [{name: a, namespace: ns, node: n, addresses: [10.0.0.1]}]\nservices: [{name: s, namespace: ns, vips: [10.96.0.1], ports: [{port: 80}]}]",
        )
        .unwrap();
        let resources: BTreeMap<Key, String> = snapshot.resources().map(|r| (r.key(), r.encode())).collect();
        let cursor = Cursor { epoch: "e".into(), version: 7 };
        let file = ConfigFile::new(path.clone());
        file.save(&cursor, &resources);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let loaded = loop {
            if let Ok(Some(a)) = load(&path) {
                break a;
            }
            assert!(std::time::Instant::now() < deadline, "not written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(loaded.cursor, cursor);
        assert_eq!(loaded.resources, resources);
        assert_eq!(loaded.decoded().len(), 2);
        assert!(load(&dir.join("absent.json")).unwrap().is_none());
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(load(&path), Err(PersistError::Invalid { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
