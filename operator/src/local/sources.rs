//! The CR files local mode runs from: collected from files and directories, admitted exactly
//! as the API server would (an edit is admitted as an update of the previous object, so
//! immutable fields stay immutable), and watched for changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use relayfed_crds::AnyResource;
use relayfed_crds::admission::admit_update;
use serde_json::Value;
use sha2::Digest;

/// `(kind, namespace, name)` of an object.
pub type ObjectKey = (String, String, String);

/// The admitted contents of the sources at one moment.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// Admitted resources, in file then document order.
    pub resources: Vec<AnyResource>,
    /// The raw documents by object, for admitting the next edit as an update.
    pub raw: BTreeMap<ObjectKey, Value>,
    /// Hash of the files' names and contents.
    pub fingerprint: [u8; 32],
    /// The files read.
    pub files: Vec<PathBuf>,
}

/// The inputs given with `-f`.
#[derive(Clone, Debug)]
pub struct Sources {
    inputs: Vec<PathBuf>,
}

fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

impl Sources {
    /// Sources from `-f` arguments (files, or directories whose `*.yaml|*.yml|*.json` files
    /// are read in name order).
    pub fn new(inputs: Vec<PathBuf>) -> Self {
        Self { inputs }
    }

    /// The files the inputs name now.
    pub fn files(&self) -> Result<Vec<PathBuf>, String> {
        let mut out = Vec::new();
        for input in &self.inputs {
            if input.is_dir() {
                let rd = std::fs::read_dir(input).map_err(|e| format!("{}: {e}", input.display()))?;
                let mut files: Vec<PathBuf> =
                    rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && is_manifest(p)).collect();
                files.sort();
                out.extend(files);
            } else if input.is_file() {
                out.push(input.clone());
            } else {
                return Err(format!("{}: no such file or directory", input.display()));
            }
        }
        if out.is_empty() {
            return Err("no manifests (*.yaml, *.yml, *.json) in the given paths".into());
        }
        Ok(out)
    }

    /// Reads every file once: names, contents and their hash (the watcher compares hashes).
    pub fn read(&self) -> Result<Contents, String> {
        let mut h = sha2::Sha256::new();
        let mut files = Vec::new();
        for f in self.files()? {
            let bytes = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            h.update(f.display().to_string().as_bytes());
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(&bytes);
            files.push((f, bytes));
        }
        Ok(Contents { files, fingerprint: h.finalize().into() })
    }

    /// Reads and admits every document (see [`admit`]).
    pub fn load(&self, previous: Option<&Loaded>) -> Result<Loaded, Vec<String>> {
        admit(&self.read().map_err(|e| vec![e])?, previous)
    }
}

/// The files of the sources as read at one moment.
#[derive(Clone, Debug)]
pub struct Contents {
    /// Each file and its bytes, in read order.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Hash of the names and contents.
    pub fingerprint: [u8; 32],
}

/// Admits every document of `contents`; with `previous`, objects that existed before are
/// admitted as updates. Returns every rejection message (the API server's wording).
pub fn admit(contents: &Contents, previous: Option<&Loaded>) -> Result<Loaded, Vec<String>> {
    let mut resources = Vec::new();
    let mut raw = BTreeMap::new();
    let mut errors = Vec::new();
    for (f, bytes) in &contents.files {
        let name = f.display().to_string();
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{name}: not UTF-8: {e}"));
                continue;
            }
        };
        let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{name}: not valid YAML: {}", relayfed_crds::yaml_error_reason(&e)));
                continue;
            }
        };
        for (index, doc) in docs.into_iter().enumerate().filter(|(_, d)| !d.is_null()) {
            let key = object_key(&doc);
            let old = previous.and_then(|p| p.raw.get(&key));
            match admit_update(&name, index, doc.clone(), old) {
                Ok(r) => {
                    if raw.insert(key.clone(), doc).is_some() {
                        errors.push(format!("{name}: {} {:?} is defined twice", key.0, key.2));
                    }
                    resources.push(r);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    let files = contents.files.iter().map(|(f, _)| f.clone()).collect();
    if errors.is_empty() {
        Ok(Loaded { resources, raw, fingerprint: contents.fingerprint, files })
    } else {
        Err(errors)
    }
}

fn object_key(doc: &Value) -> ObjectKey {
    let s = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or("").to_owned();
    (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
}
