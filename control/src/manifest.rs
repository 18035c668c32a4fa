//! Kubernetes manifests -> typed objects.
//!
//! Reads what `kubectl apply -f` reads: multi-document YAML (or JSON) files, or a directory
//! of them (every `*.yaml`, `*.yml` and `*.json` file, in name order, not recursive). kxp
//! keeps `v1 Service` and `discovery.k8s.io/v1 EndpointSlice` objects, also inside
//! `kind: List` (and `ServiceList`, `EndpointSliceList`) documents. Anything else is skipped
//! with a notice. A document that cannot be decoded is reported with its file, its position
//! and, when known, its kind and name; the other documents still load.

use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_yaml::Value;

use crate::error::ConfigError;

/// The namespace of objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything read from a set of manifests.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Documents skipped on purpose (other kinds), one line each.
    pub notices: Vec<String>,
    /// Documents that could not be read or decoded.
    pub errors: Vec<ConfigError>,
}

/// Loads a manifest file or a directory of them.
pub fn load_manifests(path: impl AsRef<Path>) -> ManifestSet {
    let mut set = ManifestSet::default();
    set.add_path(path);
    set
}

/// Parses multi-document YAML text; `origin` names it in notices and errors.
pub fn parse_manifests(yaml: &str, origin: &str) -> ManifestSet {
    let mut set = ManifestSet::default();
    set.add_yaml(yaml, origin);
    set
}

impl ManifestSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file (whatever its name) or every `*.yaml`/`*.yml`/`*.json` file of a
    /// directory, in name order.
    pub fn add_path(&mut self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return self.errors.push(ConfigError::io(shown, e)),
        };
        if !meta.is_dir() {
            return self.add_file(path);
        }
        let entries = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => return self.errors.push(ConfigError::io(shown, e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => {
                    let p = entry.path();
                    let wanted = p
                        .extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
                    if wanted && p.is_file() {
                        files.push(p);
                    }
                }
                Err(e) => self.errors.push(ConfigError::io(&shown, e)),
            }
        }
        files.sort();
        for f in files {
            self.add_file(&f);
        }
    }

    /// Adds one file: JSON if its name ends in `.json`, YAML otherwise.
    pub fn add_file(&mut self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) if path.extension().is_some_and(|e| e == "json") => {
                self.add_json(&text, &shown)
            }
            Ok(text) => self.add_yaml(&text, &shown),
            Err(e) => self.errors.push(ConfigError::io(shown, e)),
        }
    }

    /// Adds the documents of a (multi-document) YAML text.
    pub fn add_yaml(&mut self, yaml: &str, origin: &str) {
        let mut document = 0;
        for (chunk, first_line) in split_documents(yaml) {
            let value = match serde_yaml::from_str::<Value>(&chunk) {
                Ok(Value::Null) => continue,
                Ok(mut v) => match v.apply_merge() {
                    Ok(()) => v,
                    Err(e) => {
                        document += 1;
                        let message = relocated(&e, first_line);
                        self.errors
                            .push(doc_error(origin, document, None, "", message));
                        continue;
                    }
                },
                Err(e) => {
                    document += 1;
                    let message = relocated(&e, first_line);
                    self.errors
                        .push(doc_error(origin, document, None, "", message));
                    continue;
                }
            };
            document += 1;
            self.add_document(value, Some((&chunk, first_line)), origin, document, "");
        }
    }

    /// Adds the values of a JSON text (one object, or several one after the other).
    pub fn add_json(&mut self, json: &str, origin: &str) {
        let stream = serde_json::Deserializer::from_str(json).into_iter::<serde_json::Value>();
        for (i, item) in stream.enumerate() {
            let document = i + 1;
            let value = match item
                .map_err(|e| e.to_string())
                .and_then(|v| serde_yaml::to_value(&v).map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => {
                    // A JSON syntax error ends the stream: there is no resynchronising.
                    self.errors.push(doc_error(origin, document, None, "", e));
                    return;
                }
            };
            if !value.is_null() {
                self.add_document(value, None, origin, document, "");
            }
        }
    }

    /// Adds everything of `other` after what is already here.
    pub fn extend(&mut self, other: ManifestSet) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.notices.extend(other.notices);
        self.errors.extend(other.errors);
    }

    /// Dispatches one decoded document (or `List` item) on its apiVersion and kind.
    /// `text` is the document's own YAML, used to re-decode for a message with the field
    /// path and line when decoding fails.
    fn add_document(
        &mut self,
        value: Value,
        text: Option<(&str, usize)>,
        file: &str,
        document: usize,
        field: &str,
    ) {
        let meta = TypeMeta::of(&value);
        let what = meta.describe();
        let at = |field: &str| {
            let mut s = format!("{file}: document {document}");
            if !field.is_empty() {
                s.push_str(": ");
                s.push_str(field);
            }
            s
        };
        if !value.is_mapping() {
            self.errors.push(doc_error(
                file,
                document,
                None,
                field,
                "not an object (expected a mapping with apiVersion and kind)".into(),
            ));
            return;
        }
        let (Some(api_version), Some(kind)) = (meta.api_version.as_deref(), meta.kind.as_deref())
        else {
            let missing = if meta.kind.is_none() {
                "kind"
            } else {
                "apiVersion"
            };
            self.errors.push(doc_error(
                file,
                document,
                what,
                field,
                format!("{missing} is missing"),
            ));
            return;
        };

        match (api_version, kind) {
            ("v1", "Service") => {
                if let Some(mut svc) = self.decode::<Service>(value, text, file, document, field) {
                    if svc.metadata.name.as_deref().unwrap_or("").is_empty() {
                        self.errors.push(doc_error(
                            file,
                            document,
                            what,
                            field,
                            "metadata.name: required".into(),
                        ));
                        return;
                    }
                    svc.metadata
                        .namespace
                        .get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
                    self.services.push(svc);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(mut slice) =
                    self.decode::<EndpointSlice>(value, text, file, document, field)
                {
                    if slice.metadata.name.as_deref().unwrap_or("").is_empty() {
                        self.errors.push(doc_error(
                            file,
                            document,
                            what,
                            field,
                            "metadata.name: required".into(),
                        ));
                        return;
                    }
                    slice
                        .metadata
                        .namespace
                        .get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
                    self.slices.push(slice);
                }
            }
            (_, "Service" | "EndpointSlice") => self.notices.push(format!(
                "{}: skipped {} (apiVersion {api_version} is not supported)",
                at(field),
                what.unwrap_or_default()
            )),
            (_, list) if list.ends_with("List") && field.is_empty() => {
                let items = match value.get("items") {
                    None | Some(Value::Null) => return,
                    Some(Value::Sequence(items)) => items.clone(),
                    Some(_) => {
                        self.errors.push(doc_error(
                            file,
                            document,
                            what,
                            "items",
                            "not a list".into(),
                        ));
                        return;
                    }
                };
                for (i, item) in items.into_iter().enumerate() {
                    if !item.is_null() {
                        self.add_document(item, None, file, document, &format!("items[{i}]"));
                    }
                }
            }
            _ => self.notices.push(format!(
                "{}: skipped {}",
                at(field),
                what.unwrap_or_default()
            )),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &mut self,
        value: Value,
        text: Option<(&str, usize)>,
        file: &str,
        document: usize,
        field: &str,
    ) -> Option<T> {
        match T::deserialize(&value) {
            Ok(obj) => Some(obj),
            Err(e) => {
                // Decoding the value (merge keys applied) gives neither the field path nor
                // the line; decoding text again does. Without the document's own text (List
                // items, JSON), decode the value re-serialised, for the path only.
                let message = match text {
                    Some((text, first_line)) => match serde_yaml::from_str::<T>(text) {
                        Err(better) => relocated(&better, first_line),
                        Ok(_) => e.to_string(),
                    },
                    None => {
                        match serde_yaml::to_string(&value).map(|t| serde_yaml::from_str::<T>(&t)) {
                            Ok(Err(better)) => without_location(&better),
                            _ => e.to_string(),
                        }
                    }
                };
                let what = TypeMeta::of(&value).describe();
                self.errors
                    .push(doc_error(file, document, what, field, message));
                None
            }
        }
    }
}

/// A decoder message about a document that starts on line `first_line` (0-based) of its
/// file, with every "line N" in it (libyaml names the problem and its context) made the
/// file's.
fn relocated(e: &serde_yaml::Error, first_line: usize) -> String {
    let message = e.to_string();
    if first_line == 0 {
        return message;
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message.as_str();
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + first_line).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// A decoder message without its " at line L column C" (when the lines are not the file's).
fn without_location(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    let Some(loc) = e.location() else {
        return message;
    };
    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
    match message.strip_suffix(&suffix) {
        Some(m) => m.to_string(),
        None => message,
    }
}

fn doc_error(
    file: &str,
    document: usize,
    object: Option<String>,
    field: &str,
    message: String,
) -> ConfigError {
    ConfigError::Document {
        file: file.to_string(),
        document,
        object,
        field: field.to_string(),
        message,
    }
}

/// What a document says it is, read leniently so that errors can name it.
#[derive(Debug, Default)]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

impl TypeMeta {
    fn of(v: &Value) -> Self {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let meta = v.get("metadata");
        Self {
            api_version: s(v.get("apiVersion")),
            kind: s(v.get("kind")),
            namespace: s(meta.and_then(|m| m.get("namespace"))),
            name: s(meta.and_then(|m| m.get("name"))),
        }
    }

    /// `Kind namespace/name` (namespace defaulted), or as much of it as is known.
    fn describe(&self) -> Option<String> {
        let kind = self.kind.as_deref();
        let name = self.name.as_deref().filter(|n| !n.is_empty());
        match (kind, name) {
            (None, None) => None,
            (kind, name) => {
                let kind = kind.unwrap_or("object");
                let Some(name) = name else {
                    return Some(kind.to_string());
                };
                let ns = self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
                Some(format!("{kind} {ns}/{name}"))
            }
        }
    }
}

/// Splits a YAML stream into its documents at `---` (and `...`) marker lines, each with
/// the 0-based line of the file it starts on, so that the parser's line numbers can be
/// made the file's ([`relocated`]). Parsing documents one by one keeps a broken document
/// from hiding the others. (Padding each document with its preceding lines instead would
/// make a large file quadratic: 20,000 documents took minutes.)
fn split_documents(text: &str) -> Vec<(String, usize)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut first_line = 0;
    for (n, line) in text.lines().enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if let Some(rest) = marker("---") {
            docs.push((std::mem::take(&mut current), first_line));
            first_line = n;
            // Content after the marker ("--- !tag", "--- {a: 1}") stays, on its line.
            current.push_str("   ");
            current.push_str(rest);
            current.push('\n');
        } else if marker("...").is_some() {
            docs.push((std::mem::take(&mut current), first_line));
            first_line = n + 1;
        } else if line.starts_with('%') {
            // A directive (%YAML, %TAG) belongs before a "---"; kxp needs none.
            current.push('\n');
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((current, first_line));
    docs
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    const MIXED: &str = r#"# a comment before the first document
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
    - name: http
      port: 80
      targetPort: http
---
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - name: http
    port: 8080
endpoints:
  - addresses: [10.244.1.2]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: apps
data:
  a: b
---
apiVersion: v1
kind: Service
metadata:
  name: broken
  namespace: apps
spec:
  ports:
    - port: eighty
---
apiVersion: v1
kind: Service
metadata: {name: after, namespace: apps}
spec: {clusterIP: 10.96.0.11, ports: [{port: 53, protocol: UDP}]}
"#;

    #[test]
    fn multi_document_with_other_kinds_and_a_broken_one() {
        let set = parse_manifests(MIXED, "app.yaml");
        let names: Vec<_> = set
            .services
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap(),
                    s.metadata.name.as_deref().unwrap()
                )
            })
            .collect();
        assert_eq!(names, ["default/web", "apps/after"]);
        let web = &set.services[0];
        assert_eq!(
            web.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].target_port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(set.slices.len(), 1);
        assert_eq!(set.slices[0].endpoints[0].addresses, ["10.244.1.2"]);

        assert_eq!(set.notices.len(), 1, "{:?}", set.notices);
        assert_eq!(
            set.notices[0],
            "app.yaml: document 3: skipped ConfigMap apps/settings"
        );

        assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
        let e = set.errors[0].to_string();
        assert!(
            e.starts_with("app.yaml: document 4 (Service apps/broken): spec.ports[0].port: "),
            "{e}"
        );
        // The line is the file's, not the document's.
        let line = MIXED.lines().position(|l| l.contains("eighty")).unwrap() + 1;
        assert!(e.contains(&format!("line {line} ")), "{e}");
    }

    #[test]
    fn documents_are_split_without_padding() {
        // 2,000 documents: what the parser is handed stays proportional to the file (no
        // document carries the lines before it), and each knows where it starts.
        let doc = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n";
        let text = format!("---\n{doc}").repeat(2_000);
        let docs = split_documents(&text);
        assert_eq!(docs.len(), 2_001);
        let total: usize = docs.iter().map(|(d, _)| d.len()).sum();
        assert!(total <= text.len() + 4 * docs.len(), "{total} bytes parsed");
        assert_eq!(docs[2].1, 4, "the second document starts on line 5");
    }

    #[test]
    fn syntax_error_in_one_document_keeps_the_others() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let set = parse_manifests(text, "x.yaml");
        assert_eq!(set.services.len(), 2);
        assert_eq!(set.errors.len(), 1);
        let e = set.errors[0].to_string();
        assert!(e.starts_with("x.yaml: document 2: "), "{e}");
        assert!(e.contains("line 6") || e.contains("line 7"), "{e}");
    }

    #[test]
    fn list_items_and_namespace_default() {
        let text = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: a}
    spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: p, namespace: x}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}
    addressType: IPv4
    endpoints: "nope"
  - apiVersion: discovery.k8s.io/v1beta1
    kind: EndpointSlice
    metadata: {name: old}
"#;
        let set = parse_manifests(text, "list.yaml");
        assert_eq!(set.services.len(), 1);
        assert_eq!(
            set.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(set.notices.len(), 2, "{:?}", set.notices);
        assert_eq!(
            set.notices[0],
            "list.yaml: document 1: items[1]: skipped Pod x/p"
        );
        assert!(set.notices[1].contains("apiVersion discovery.k8s.io/v1beta1"));
        assert_eq!(set.errors.len(), 1);
        assert_eq!(
            set.errors[0].to_string(),
            "list.yaml: document 1 (EndpointSlice default/a-1): items[2]: \
             endpoints: invalid type: string \"nope\", expected a sequence"
        );
    }

    #[test]
    fn missing_kind_and_empty_documents() {
        let set = parse_manifests("---\n# nothing\n---\n\n---\nfoo: bar\n", "e.yaml");
        assert!(set.services.is_empty() && set.notices.is_empty());
        assert_eq!(set.errors.len(), 1);
        assert_eq!(
            set.errors[0].to_string(),
            "e.yaml: document 1: kind is missing"
        );
    }

    #[test]
    fn loads_a_directory_in_name_order_with_json() {
        let dir = std::env::temp_dir().join(format!("kxp-manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("a.json"),
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("c.yml"), "{{{").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let set = load_manifests(&dir);
        let names: Vec<_> = set
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
        assert!(set.errors[0].object().ends_with("c.yml"));
        assert!(matches!(
            load_manifests(dir.join("missing.yaml")).errors[..],
            [ConfigError::Io { .. }]
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
