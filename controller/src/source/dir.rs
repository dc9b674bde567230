//! The directory source: the cluster as a directory of YAML files, for machines without
//! Kubernetes (the lab, VMs). Every `*.yaml` / `*.yml` file under the directory, at any
//! depth, holds Kubernetes objects: several documents separated by `---`, and `kind: List`
//! (or `PodList`, ...) documents with `items`, as `kubectl get -o yaml` writes them.
//!
//! [`DirSource::scan`] re-reads the directory and returns what changed since the last scan;
//! the caller polls it. A scan is cheap when nothing changed: one `stat` per file, and a
//! file is read again only when its size, modification time or inode moved (or it was
//! modified less than [`RACY`] before it was last read, when a quick second write could
//! leave both unchanged). A file that was read again but holds the same bytes (a hash of its
//! contents) changes nothing.
//!
//! What a bad file does, so that a typo never deletes what it did not mean to:
//!
//! | the file | what is rejected | what happens to the objects it defined |
//! | --- | --- | --- |
//! | the YAML itself does not parse (or is not UTF-8) | the whole file | all kept as they were |
//! | one document does not read as its kind, but says which object it is | that document | that object keeps its last good version |
//! | one document does not even say which object it is | that document | none of the file's objects is deleted |
//! | it cannot be read, or a directory cannot be listed | the file, every file under the directory | all kept as they were |
//! | it is deleted | | deleted |
//!
//! Documents of kinds the controller does not read (Deployments, ConfigMaps, ...) are
//! skipped with a debug line; kinds it reads at an `apiVersion` it does not are rejected.
//! When two documents define the same object, the later one wins (the later file in path
//! order, or the later document in one file) and the other is reported. Names that start
//! with `.` are skipped: editors' temporary files, and the `..data` links of a mounted
//! ConfigMap, whose files would otherwise be read twice. Symbolic links are followed;
//! a directory is listed once, so a link loop ends.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use serde_saphyr::Spanned;

use super::{Event, Object, ObjectRef, Origin, Rejection};

/// A file modified this shortly before it was read is read again at the next scan even if
/// its size and modification time did not move: a second write within the timestamp's
/// granularity (a second, on some file systems) would leave both unchanged.
pub const RACY: Duration = Duration::from_secs(2);

/// A directory of YAML files, read as cluster objects.
#[derive(Debug)]
pub struct DirSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Every definition of every object, by where it is written; the last one wins.
    definitions: HashMap<ObjectRef, BTreeMap<Position, Definition>>,
    /// The winning version of every object, as the scans reported it.
    current: HashMap<ObjectRef, Arc<Object>>,
    /// Objects defined more than once: one rejection per losing definition.
    duplicates: BTreeMap<ObjectRef, Vec<Rejection>>,
    /// Files and directories that could not be read at the last scan.
    unreadable: BTreeMap<PathBuf, Rejection>,
    /// Inotify watches on the directory, set up at the first wait (`None` until then, or
    /// without inotify).
    notify: Option<Option<super::notify::Notify>>,
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// What changed since the last scan: applied objects (namespaces first), then deletions.
    pub events: Vec<Event>,
    /// Rejections found by this scan (each is also logged); [`DirSource::rejected`] lists
    /// all that are current.
    pub rejected: Vec<Rejection>,
}

/// What is known of one file.
#[derive(Debug, Default)]
struct FileState {
    /// The file's stamp when it was read, if it can be trusted to change with its contents.
    stamp: Option<Stamp>,
    hash: u64,
    /// The objects it defines (some perhaps kept from an earlier version of the file).
    defines: Vec<(ObjectRef, Position)>,
    rejected: Vec<Rejection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

/// Where a definition is written; later positions win.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    file: PathBuf,
    document: usize,
    /// The index in a list document, 0 otherwise.
    item: usize,
}

#[derive(Debug, Clone)]
struct Definition {
    object: Arc<Object>,
    origin: Origin,
}

/// A file, read.
enum Parsed {
    /// The YAML itself could not be read: nothing in it is trusted.
    Broken(Rejection),
    Read(ReadFile),
}

#[derive(Default)]
struct ReadFile {
    objects: Vec<(ObjectRef, Position, Definition)>,
    rejected: Vec<Rejection>,
    /// Objects named by documents that were rejected: their last good version is kept.
    rejected_objects: BTreeSet<ObjectRef>,
    /// Whether a rejected document did not even say which object it is.
    unidentified: bool,
}

/// The files found under the root.
#[derive(Default)]
struct Listing {
    files: BTreeMap<PathBuf, Stamp>,
    /// Directories and entries that could not be read, and why.
    unreadable: Vec<(PathBuf, io::Error)>,
}

impl DirSource {
    /// A source reading `root`. Nothing is read until [`DirSource::scan`].
    pub fn new(root: impl Into<PathBuf>) -> DirSource {
        DirSource {
            root: root.into(),
            files: BTreeMap::new(),
            definitions: HashMap::new(),
            current: HashMap::new(),
            duplicates: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            notify: None,
        }
    }

    /// Waits for a change reported by inotify, `timeout` at most. Returns `false` at once when
    /// inotify is not available (the caller then polls), `true` otherwise (changed or timed
    /// out: either way it is time to scan).
    pub fn wait_for_change(&mut self, timeout: Duration) -> bool {
        let root = self.root.clone();
        match self.notify.get_or_insert_with(|| super::notify::Notify::new(&root)) {
            Some(notify) => {
                notify.wait(timeout);
                true
            }
            None => false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads the directory; returns what changed since the last scan and the rejections
    /// it found. The first scan returns every object.
    pub fn scan(&mut self) -> Scan {
        let started = SystemTime::now();
        let listing = list(&self.root);
        let mut touched = BTreeSet::new();
        let mut found = Vec::new();

        let mut unreadable = BTreeMap::new();
        for (path, error) in listing.unreadable {
            let rejection = Rejection::new(format!(
                "cannot be read ({error}); the objects of the files in it are kept as they were"
            ))
            .with_origin(whole(&path));
            unreadable.insert(path, rejection);
        }

        let gone: Vec<PathBuf> = unlisted(&self.files, &listing.files)
            .into_iter()
            .filter(|p| !unreadable.keys().any(|u| p.starts_with(u)))
            .cloned()
            .collect();
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                self.forget(&state.defines, &mut touched);
            }
        }

        for (path, stamp) in to_read(&self.files, listing.files) {
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                // Deleted since it was listed: the next scan sees it gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let why = format!("cannot be read ({e}); the objects it defined are kept as they were");
                    unreadable.insert(path.clone(), Rejection::new(why).with_origin(whole(&path)));
                    continue;
                }
            };
            let trusted = stamp.modified.is_some_and(|m| m + RACY <= started);
            let stamp = trusted.then_some(stamp);
            let hash = hash(&bytes);
            if let Some(state) = self.files.get_mut(&path)
                && state.hash == hash
            {
                state.stamp = stamp;
                continue;
            }
            let parsed = parse(&path, &bytes);
            let state = self.files.remove(&path).unwrap_or_default();
            let state = self.replace(state, parsed, &mut touched);
            found.extend(state.rejected.iter().cloned());
            self.files.insert(path, FileState { stamp, hash, ..state });
        }

        for (path, rejection) in &unreadable {
            if self.unreadable.get(path) != Some(rejection) {
                found.push(rejection.clone());
            }
        }
        self.unreadable = unreadable;

        let events = self.publish(touched, &mut found);
        for rejection in &found {
            tracing::warn!("rejected: {rejection}");
        }
        Scan { events, rejected: found }
    }

    /// Every rejection that holds now: unreadable files and documents, objects defined
    /// twice. For a status page.
    pub fn rejected(&self) -> Vec<Rejection> {
        let files = self.files.values().flat_map(|f| f.rejected.iter());
        let duplicates = self.duplicates.values().flatten();
        files.chain(self.unreadable.values()).chain(duplicates).cloned().collect()
    }

    /// Where the current version of `object` is written: to locate a rejection that
    /// translation found in it.
    pub fn origin(&self, object: &ObjectRef) -> Option<&Origin> {
        let (_, winner) = self.definitions.get(object)?.last_key_value()?;
        Some(&winner.origin)
    }

    /// Replaces what `state` (the file's last reading) defines with what `parsed` holds.
    fn replace(&mut self, mut state: FileState, parsed: Parsed, touched: &mut BTreeSet<ObjectRef>) -> FileState {
        let read = match parsed {
            Parsed::Broken(mut rejection) => {
                let kept = state.defines.len();
                rejection.reason.push_str(&match kept {
                    0 => "; it defined no object before".to_owned(),
                    1 => "; the object it defined before is kept until it reads again".to_owned(),
                    n => format!("; the {n} objects it defined before are kept until it reads again"),
                });
                state.rejected = vec![rejection];
                return state;
            }
            Parsed::Read(read) => read,
        };

        let defined: HashSet<&ObjectRef> = read.objects.iter().map(|(r, _, _)| r).collect();
        let keep = |r: &ObjectRef| !defined.contains(r) && (read.unidentified || read.rejected_objects.contains(r));
        let (kept, dropped): (Vec<_>, Vec<_>) = state.defines.into_iter().partition(|(r, _)| keep(r));
        self.forget(&dropped, touched);

        let mut rejected = read.rejected;
        for rejection in &mut rejected {
            match &rejection.object {
                Some(r) if kept.iter().any(|(k, _)| k == r) => {
                    rejection.reason.push_str("; the version read before is kept");
                }
                None if !kept.is_empty() => {
                    rejection.reason.push_str(
                        "; as this document does not say which object it is, no object missing from this file is deleted",
                    );
                }
                _ => {}
            }
        }

        let mut defines = kept;
        for (object, position, definition) in read.objects {
            touched.insert(object.clone());
            self.definitions.entry(object.clone()).or_default().insert(position.clone(), definition);
            defines.push((object, position));
        }
        FileState { stamp: None, hash: 0, defines, rejected }
    }

    /// Removes these definitions.
    fn forget(&mut self, defines: &[(ObjectRef, Position)], touched: &mut BTreeSet<ObjectRef>) {
        for (object, position) in defines {
            if let Some(defs) = self.definitions.get_mut(object) {
                defs.remove(position);
                if defs.is_empty() {
                    self.definitions.remove(object);
                }
            }
            touched.insert(object.clone());
        }
    }

    /// Compares the winning definition of each touched object with what was reported, and
    /// reports definitions that lost to another.
    fn publish(&mut self, touched: BTreeSet<ObjectRef>, found: &mut Vec<Rejection>) -> Vec<Event> {
        let mut applied = Vec::new();
        let mut deleted = Vec::new();
        for object in touched {
            let defs = self.definitions.get(&object);
            match defs.and_then(|d| d.last_key_value()) {
                Some((_, winner)) => {
                    let same = self
                        .current
                        .get(&object)
                        .is_some_and(|c| Arc::ptr_eq(c, &winner.object) || **c == *winner.object);
                    if !same {
                        self.current.insert(object.clone(), winner.object.clone());
                        applied.push(Event::Applied((*winner.object).clone()));
                    }
                }
                None => {
                    if self.current.remove(&object).is_some() {
                        deleted.push(Event::Deleted(object.clone()));
                    }
                }
            }

            let losers: Vec<Rejection> = match defs.and_then(|d| d.last_key_value().map(|w| (d, w))) {
                Some((defs, (_, winner))) if defs.len() > 1 => defs
                    .values()
                    .take(defs.len() - 1)
                    .map(|loser| {
                        Rejection::new(format!("also defined in {}, which wins (the later definition)", winner.origin))
                            .about(object.clone())
                            .with_origin(loser.origin.clone())
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if losers.is_empty() {
                self.duplicates.remove(&object);
            } else if self.duplicates.get(&object) != Some(&losers) {
                found.extend(losers.iter().cloned());
                self.duplicates.insert(object, losers);
            }
        }
        // Deletions last, namespaces after what was in them.
        deleted.reverse();
        applied.extend(deleted);
        applied
    }
}

/// The files of `held` that `listed` lacks. Both maps are in path order, so one pass over
/// each finds them: a lookup per file costs O(log n) path comparisons, and at 10,000 files
/// such lookups were most of a scan's time.
fn unlisted<'a, V, W>(held: &'a BTreeMap<PathBuf, V>, listed: &BTreeMap<PathBuf, W>) -> Vec<&'a PathBuf> {
    let mut listed = listed.keys().peekable();
    let mut out = Vec::new();
    for path in held.keys() {
        loop {
            match listed.peek().map(|l| (*l).cmp(path)) {
                Some(Ordering::Less) => {
                    listed.next();
                }
                Some(Ordering::Equal) => {
                    listed.next();
                    break;
                }
                Some(Ordering::Greater) | None => {
                    out.push(path);
                    break;
                }
            }
        }
    }
    out
}

/// The listed files to read: new ones, and those whose stamp moved or was not trusted. One
/// pass over both maps, as in [`unlisted`].
fn to_read(held: &BTreeMap<PathBuf, FileState>, listed: BTreeMap<PathBuf, Stamp>) -> Vec<(PathBuf, Stamp)> {
    let mut held = held.iter().peekable();
    let mut out = Vec::new();
    for (path, stamp) in listed {
        let mut known = None;
        while let Some((h, state)) = held.peek() {
            match (*h).cmp(&path) {
                Ordering::Less => {
                    held.next();
                }
                Ordering::Equal => {
                    known = Some(state.stamp);
                    held.next();
                    break;
                }
                Ordering::Greater => break,
            }
        }
        if known != Some(Some(stamp)) {
            out.push((path, stamp));
        }
    }
    out
}

/// Lists the YAML files under `root`.
fn list(root: &Path) -> Listing {
    let mut listing = Listing::default();
    let mut visited = HashSet::new();
    let mut files = Vec::new();
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {
            visited.insert((meta.dev(), meta.ino()));
            walk(root, &mut files, &mut listing, &mut visited);
        }
        Ok(_) => listing.unreadable.push((root.to_owned(), io::Error::other("not a directory"))),
        Err(e) => listing.unreadable.push((root.to_owned(), e)),
    }
    // Already in path order (see `walk`): the map is built without searching.
    listing.files = files.into_iter().collect();
    listing
}

/// Appends the YAML files under `dir` to `files` in path order: each directory's entries in
/// name order, depth first, which is the order of `Path`'s comparison.
fn walk(dir: &Path, files: &mut Vec<(PathBuf, Stamp)>, listing: &mut Listing, visited: &mut HashSet<(u64, u64)>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return listing.unreadable.push((dir.to_owned(), e)),
    };
    let mut named = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => named.push((entry.file_name(), entry)),
            Err(e) => {
                listing.unreadable.push((dir.to_owned(), e));
                break;
            }
        }
    }
    named.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (name, entry) in named {
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = dir.join(&name);
        // Follows symbolic links. Anything else is asked about relative to the open
        // directory, which spares the kernel a lookup of the whole path per file.
        let meta = match entry.file_type() {
            Ok(t) if !t.is_symlink() => entry.metadata(),
            _ => fs::metadata(&path),
        };
        let meta = match meta {
            Ok(meta) => meta,
            // A dangling link: nothing to read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                listing.unreadable.push((path, e));
                continue;
            }
        };
        if meta.is_dir() {
            if visited.insert((meta.dev(), meta.ino())) {
                walk(&path, files, listing, visited);
            }
        } else if meta.is_file() && is_yaml(&path) {
            let stamp = Stamp { len: meta.len(), modified: meta.modified().ok(), dev: meta.dev(), ino: meta.ino() };
            files.push((path, stamp));
        }
    }
}

fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

fn whole(path: &Path) -> Origin {
    Origin { file: path.to_owned(), document: None, line: None }
}

/// Reads the objects of one file.
fn parse(path: &Path, bytes: &[u8]) -> Parsed {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => return Parsed::Broken(Rejection::new(format!("not UTF-8 text ({e})")).with_origin(whole(path))),
    };
    let documents: Vec<Spanned<Value>> = match serde_saphyr::from_multiple(text) {
        Ok(documents) => documents,
        Err(e) => {
            let origin = Origin { line: e.location().map(|l| l.line() as usize), ..whole(path) };
            return Parsed::Broken(
                Rejection::new(format!("invalid YAML: {}", e.without_snippet())).with_origin(origin),
            );
        }
    };

    let mut read = ReadFile::default();
    for (index, document) in documents.into_iter().enumerate() {
        let line = document.referenced.line() as usize;
        let origin = Origin { file: path.to_owned(), document: Some(index + 1), line: (line > 0).then_some(line) };
        match list_items(document.value) {
            Ok(Items::One(value)) => read.add(value, Position::new(path, index, 0), origin, None),
            Ok(Items::List(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    read.add(item, Position::new(path, index, i), origin.clone(), Some(i));
                }
            }
            Err(rejection) => {
                read.unidentified = true;
                read.rejected.push(rejection.with_origin(origin));
            }
        }
    }
    Parsed::Read(read)
}

impl Position {
    fn new(file: &Path, document: usize, item: usize) -> Position {
        Position { file: file.to_owned(), document, item }
    }
}

impl ReadFile {
    /// Reads one object; `item` is its index when it came from a list.
    fn add(&mut self, value: Value, position: Position, origin: Origin, item: Option<usize>) {
        let described = describe(&value);
        match Object::from_value(value) {
            Ok(Some(object)) => {
                let object_ref = object.object_ref();
                self.objects.push((object_ref, position, Definition { object: Arc::new(object), origin }));
            }
            Ok(None) => tracing::debug!("{origin}: {described} is not read by the controller; skipped"),
            Err(mut rejection) => {
                if let Some(i) = item {
                    rejection.field = Some(match rejection.field {
                        Some(field) => format!("items[{i}].{field}"),
                        None => format!("items[{i}]"),
                    });
                }
                match &rejection.object {
                    Some(object) => {
                        self.rejected_objects.insert(object.clone());
                    }
                    None => self.unidentified = true,
                }
                self.rejected.push(rejection.with_origin(origin));
            }
        }
    }
}

/// `apps/v1 Deployment shop/web`, for a debug line about a skipped document.
fn describe(value: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let meta = &value["metadata"];
    let name = match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", text(&meta["name"])),
        None => text(&meta["name"]),
    };
    format!("{} {} {name}", text(&value["apiVersion"]), text(&value["kind"]))
}

enum Items {
    One(Value),
    List(Vec<Value>),
}

/// A document as the objects it holds: itself, or the items of a list. Items of a typed
/// list (`PodList`) may leave out their `apiVersion` and `kind`, as the API server does.
fn list_items(mut value: Value) -> Result<Items, Rejection> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    let Some(item_kind) = kind.strip_suffix("List") else {
        return Ok(Items::One(value));
    };
    let api_version = value.get("apiVersion").cloned();
    let Some(Value::Array(items)) = value.get_mut("items").map(Value::take) else {
        return Err(Rejection::new(format!("a {kind} needs items")).at("items"));
    };
    if item_kind.is_empty() {
        return Ok(Items::List(items));
    }
    let items = items
        .into_iter()
        .map(|mut item| {
            if let Some(fields) = item.as_object_mut() {
                fields.entry("kind").or_insert_with(|| Value::String(item_kind.to_owned()));
                if let Some(api_version) = &api_version {
                    fields.entry("apiVersion").or_insert_with(|| api_version.clone());
                }
            }
            item
        })
        .collect();
    Ok(Items::List(items))
}

/// A directory under the system's temporary directory, removed when dropped.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct TestDir {
        path: PathBuf,
    }

    impl TestDir {
        /// A new, empty directory whose name says which test made it.
        pub fn new(test: &str) -> TestDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("weft-controller-{}-{n}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TestDir { path }
        }

        pub fn path(&self) -> &Path {
            &self.path
        }

        /// Writes `text` to `name` (a path relative to the directory), creating folders.
        pub fn write(&self, name: &str, text: &str) {
            let path = self.path.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }

        pub fn remove(&self, name: &str) {
            std::fs::remove_file(self.path.join(name)).unwrap();
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestDir;
    use super::*;
    use crate::source::ObjectKind;

    fn pod(namespace: &str, name: &str, app: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: node-1, containers: [{{name: app, image: app}}]}}\n\
             status: {{podIP: 10.244.1.2}}\n"
        )
    }

    fn refs(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Applied(o) => format!("applied {}", o.object_ref()),
                Event::Deleted(r) => format!("deleted {r}"),
            })
            .collect()
    }

    fn only(rejected: &[Rejection]) -> &Rejection {
        assert_eq!(rejected.len(), 1, "{rejected:#?}");
        &rejected[0]
    }

    #[test]
    fn reads_documents_lists_and_subfolders_and_skips_what_is_not_read() {
        let dir = TestDir::new("reads");
        dir.write(
            "shop.yaml",
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}---\n\
                 apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: shop}}\nspec: {{}}\n---\n",
                pod("shop", "web-0", "web")
            ),
        );
        dir.write(
            "more/list.yml",
            "apiVersion: v1\nkind: List\nitems:\n\
             - {apiVersion: v1, kind: Service, metadata: {name: api, namespace: shop}, spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}\n\
             - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: istio, namespace: shop}, spec: {}}\n",
        );
        // Typed lists leave out their items' kind, as the API server writes them.
        dir.write(
            "more/pods.yaml",
            "apiVersion: v1\nkind: PodList\nitems:\n- {metadata: {name: api-0, namespace: shop}}\n",
        );
        dir.write("notes.txt", "kind: Pod");
        dir.write(".editor-swap.yaml", &pod("shop", "ghost", "ghost"));
        dir.write("..data/shop.yaml", &pod("shop", "twice", "twice"));

        let mut source = DirSource::new(dir.path());
        let scan = source.scan();
        assert_eq!(
            refs(&scan.events),
            ["applied Namespace shop", "applied Pod shop/api-0", "applied Pod shop/web-0", "applied Service shop/api"]
        );
        assert!(scan.rejected.is_empty(), "{:#?}", scan.rejected);
        let origin = source.origin(&ObjectRef::new(ObjectKind::Pod, Some("shop"), "web-0")).unwrap();
        assert_eq!((origin.document, origin.line), (Some(2), Some(5)), "{origin}");
    }

    #[test]
    fn a_scan_reports_only_what_changed() {
        let dir = TestDir::new("changes");
        dir.write("a.yaml", &format!("{}---\n{}", pod("shop", "web-0", "web"), pod("shop", "web-1", "web")));
        dir.write("b.yaml", &pod("shop", "api-0", "api"));
        let mut source = DirSource::new(dir.path());
        assert_eq!(source.scan().events.len(), 3);
        assert!(source.scan().events.is_empty(), "nothing changed");

        // Written again with the same bytes: the stamp moved, the contents did not.
        dir.write("a.yaml", &format!("{}---\n{}", pod("shop", "web-0", "web"), pod("shop", "web-1", "web")));
        assert!(source.scan().events.is_empty());

        dir.write("a.yaml", &format!("{}---\n{}", pod("shop", "web-0", "web"), pod("shop", "web-1", "web2")));
        let events = source.scan().events;
        assert_eq!(refs(&events), ["applied Pod shop/web-1"]);
        let Event::Applied(Object::Pod(p)) = &events[0] else { panic!("{events:?}") };
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "web2");

        dir.remove("a.yaml");
        assert_eq!(refs(&source.scan().events), ["deleted Pod shop/web-1", "deleted Pod shop/web-0"]);
        assert!(source.scan().events.is_empty());
    }

    #[test]
    fn broken_yaml_keeps_the_objects_the_file_defined() {
        let dir = TestDir::new("broken");
        dir.write("a.yaml", &format!("{}---\n{}", pod("shop", "web-0", "web"), pod("shop", "web-1", "web")));
        dir.write("b.yaml", &pod("shop", "api-0", "api"));
        let mut source = DirSource::new(dir.path());
        assert_eq!(source.scan().events.len(), 3);

        // A typo that breaks the YAML (an unclosed bracket) must not delete both pods.
        dir.write(
            "a.yaml",
            &format!(
                "{}---\n{}",
                pod("shop", "web-0", "web").replace("{app: web}", "{app: web"),
                pod("shop", "web-1", "web")
            ),
        );
        dir.write("b.yaml", &pod("shop", "api-0", "api2"));
        let scan = source.scan();
        assert_eq!(refs(&scan.events), ["applied Pod shop/api-0"], "the other file still works");
        let r = only(&scan.rejected);
        let origin = r.origin.as_ref().unwrap();
        assert_eq!(origin.file, dir.path().join("a.yaml"));
        assert!(origin.line.is_some(), "{r}");
        assert!(r.reason.starts_with("invalid YAML: "), "{r}");
        assert!(r.reason.ends_with("the 2 objects it defined before are kept until it reads again"), "{r}");
        assert_eq!(source.rejected(), scan.rejected, "the status page shows it");
        assert!(source.scan().rejected.is_empty(), "logged once, not at every scan");

        // Fixed, with one pod removed: now that one is deleted.
        dir.write("a.yaml", &pod("shop", "web-0", "web"));
        let scan = source.scan();
        assert_eq!(refs(&scan.events), ["deleted Pod shop/web-1"]);
        assert!(source.rejected().is_empty());
    }

    #[test]
    fn a_bad_document_rejects_only_itself() {
        let dir = TestDir::new("bad-document");
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
                       spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
        let policy = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                      metadata: {name: only-web, namespace: shop}\nspec: {action: ALLOW, rules: [{ports: [8080]}]}\n";
        dir.write("shop.yaml", &format!("{}---\n{service}---\n{policy}", pod("shop", "web-0", "web")));
        let mut source = DirSource::new(dir.path());
        assert_eq!(source.scan().events.len(), 3);

        // The service gets a port that is no number, the policy a field it does not have,
        // the pod a new label: the pod changes, the others keep their last good version.
        let bad_service = service.replace("port: 80", "port: eighty");
        let bad_policy = policy.replace("rules:", "rulez:");
        dir.write("shop.yaml", &format!("{}---\n{bad_service}---\n{bad_policy}", pod("shop", "web-0", "web2")));
        let scan = source.scan();
        assert_eq!(refs(&scan.events), ["applied Pod shop/web-0"]);
        assert_eq!(scan.rejected.len(), 2, "{:#?}", scan.rejected);
        let file = dir.path().join("shop.yaml");

        let s = &scan.rejected[0];
        assert_eq!(s.object, Some(ObjectRef::new(ObjectKind::Service, Some("shop"), "api")));
        assert_eq!(s.field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(s.origin, Some(Origin { file: file.clone(), document: Some(2), line: Some(7) }));
        assert!(s.reason.ends_with("; the version read before is kept"), "{s}");
        assert_eq!(
            s.to_string(),
            format!(
                "Service shop/api in {}:7 (document 2): spec.ports[0].port: invalid type: string \"eighty\", expected i32; \
                 the version read before is kept",
                file.display()
            )
        );

        let p = &scan.rejected[1];
        assert_eq!(p.object, Some(ObjectRef::new(ObjectKind::AuthorizationPolicy, Some("shop"), "only-web")));
        assert_eq!(p.field.as_deref(), Some("spec.rulez"));
        assert!(p.reason.starts_with("unknown field `rulez`"), "{p}");
        assert_eq!(p.origin.as_ref().and_then(|o| o.document), Some(3));

        // A new object that does not read is simply not there; fixing it brings it.
        dir.write("new.yaml", &bad_service.replace("name: api", "name: api2"));
        let scan = source.scan();
        assert!(scan.events.is_empty());
        assert!(!only(&scan.rejected).reason.contains("kept"), "{:?}", scan.rejected);
        dir.write("new.yaml", &service.replace("name: api", "name: api2"));
        assert_eq!(refs(&source.scan().events), ["applied Service shop/api2"]);
        assert_eq!(source.rejected().len(), 2, "the two in shop.yaml remain");
    }

    #[test]
    fn a_document_that_names_no_object_deletes_nothing() {
        let dir = TestDir::new("unidentified");
        dir.write("a.yaml", &format!("{}---\n{}", pod("shop", "web-0", "web"), pod("shop", "web-1", "web")));
        let mut source = DirSource::new(dir.path());
        assert_eq!(source.scan().events.len(), 2);

        // web-1's document lost its kind: it might be web-1, so web-1 stays.
        dir.write(
            "a.yaml",
            &format!("{}---\n{}", pod("shop", "web-0", "web"), pod("shop", "web-1", "web").replace("kind: Pod\n", "")),
        );
        let scan = source.scan();
        assert!(scan.events.is_empty(), "{:?}", refs(&scan.events));
        let r = only(&scan.rejected);
        assert_eq!((r.object.as_ref(), r.field.as_deref()), (None, Some("kind")));
        assert!(r.reason.contains("no object missing from this file is deleted"), "{r}");
    }

    #[test]
    fn kinds_read_at_another_api_version_are_rejected() {
        let dir = TestDir::new("api-version");
        dir.write("a.yaml", &pod("shop", "web-0", "web").replace("apiVersion: v1", "apiVersion: v2"));
        let mut source = DirSource::new(dir.path());
        let scan = source.scan();
        assert!(scan.events.is_empty());
        let r = only(&scan.rejected);
        assert_eq!(r.object, Some(ObjectRef::new(ObjectKind::Pod, Some("shop"), "web-0")));
        assert_eq!(r.field.as_deref(), Some("apiVersion"));
        assert_eq!(r.reason, "Pod of apiVersion \"v2\" is not read; use v1");
    }

    #[test]
    fn the_later_definition_wins_and_the_other_is_reported() {
        let dir = TestDir::new("duplicates");
        dir.write("a.yaml", &pod("shop", "web-0", "from-a"));
        dir.write("b.yaml", &pod("shop", "web-0", "from-b"));
        let mut source = DirSource::new(dir.path());
        let scan = source.scan();
        let [Event::Applied(Object::Pod(p))] = scan.events.as_slice() else { panic!("{:?}", refs(&scan.events)) };
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "from-b");
        let r = only(&scan.rejected);
        assert_eq!(r.origin.as_ref().map(|o| o.file.clone()), Some(dir.path().join("a.yaml")));
        assert!(r.reason.starts_with(&format!("also defined in {}", dir.path().join("b.yaml").display())), "{r}");
        assert!(source.scan().rejected.is_empty(), "reported once");
        assert_eq!(source.rejected().len(), 1);

        dir.remove("b.yaml");
        let scan = source.scan();
        let [Event::Applied(Object::Pod(p))] = scan.events.as_slice() else { panic!("{:?}", refs(&scan.events)) };
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "from-a", "the remaining definition");
        assert!(source.rejected().is_empty());
    }

    #[test]
    fn a_directory_that_cannot_be_read_keeps_everything() {
        let dir = TestDir::new("unreadable");
        let root = dir.path().join("cluster");
        dir.write("cluster/a.yaml", &pod("shop", "web-0", "web"));
        let mut source = DirSource::new(&root);
        assert_eq!(source.scan().events.len(), 1);

        let away = dir.path().join("away");
        std::fs::rename(&root, &away).unwrap();
        let scan = source.scan();
        assert!(scan.events.is_empty(), "a missing directory deletes nothing");
        let r = only(&scan.rejected);
        assert_eq!(r.origin.as_ref().map(|o| o.file.clone()), Some(root.clone()));
        assert!(r.reason.contains("kept as they were"), "{r}");

        std::fs::rename(&away, &root).unwrap();
        assert!(source.scan().events.is_empty());
        assert!(source.rejected().is_empty());
    }
}
