//! Configuration errors: what went wrong, where (file or `namespace/name`), and in which
//! field, so that a user can find the line to fix.
//!
//! Every variant renders as `object: field: message` (the field is left out when empty),
//! e.g. `default/web: spec.ports[1].port: 70000 is out of range`.

use core::fmt;

/// A problem in one of kxp's inputs (the node file or a Kubernetes manifest).
///
/// Errors are collected, not fatal: a bad object is left out and the rest still compiles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A file or directory could not be read.
    #[error("{object}: {message}")]
    Io { object: String, message: String },

    /// A file is not valid YAML, or its content does not have the expected shape (unknown
    /// or missing field, wrong type). The decoder's message names the field path.
    #[error("{object}: {}{message}", FieldPrefix(.field))]
    Syntax {
        object: String,
        field: String,
        message: String,
    },

    /// One document of a manifest file could not be decoded.
    #[error(
        "{file}: document {document}{}: {}{message}",
        ObjectSuffix(.object),
        FieldPrefix(.field)
    )]
    Document {
        file: String,
        /// 1-based position of the document in its file (`---`-separated).
        document: usize,
        /// `Kind namespace/name`, when the document got that far.
        object: Option<String>,
        /// Path inside the document (e.g. `items[3]` for an item of a `List`), may be empty.
        field: String,
        message: String,
    },

    /// A value that decodes but is not acceptable (bad address, port out of range, unknown
    /// enum value, reference to something that does not exist).
    #[error("{object}: {}{message}", FieldPrefix(.field))]
    Invalid {
        object: String,
        field: String,
        message: String,
    },

    /// A frontend (address, protocol, port) that another service already took; the first
    /// one (in namespace/name order) keeps it.
    #[error("{object}: {}{message}", FieldPrefix(.field))]
    Clash {
        object: String,
        field: String,
        message: String,
    },
}

impl ConfigError {
    pub fn io(object: impl Into<String>, err: impl fmt::Display) -> Self {
        Self::Io {
            object: object.into(),
            message: err.to_string(),
        }
    }

    pub fn syntax(object: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Syntax {
            object: object.into(),
            field: String::new(),
            message: message.into(),
        }
    }

    pub fn invalid(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn clash(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Clash {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The file or object the error is about (`Document` errors: the file).
    pub fn object(&self) -> &str {
        match self {
            Self::Io { object, .. }
            | Self::Syntax { object, .. }
            | Self::Invalid { object, .. }
            | Self::Clash { object, .. } => object,
            Self::Document { file, .. } => file,
        }
    }

    /// The field path the error is about; empty when it is about the whole object (or when
    /// the path is part of a decoder's message).
    pub fn field(&self) -> &str {
        match self {
            Self::Io { .. } => "",
            Self::Syntax { field, .. }
            | Self::Invalid { field, .. }
            | Self::Clash { field, .. }
            | Self::Document { field, .. } => field,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Io { message, .. }
            | Self::Syntax { message, .. }
            | Self::Invalid { message, .. }
            | Self::Clash { message, .. }
            | Self::Document { message, .. } => message,
        }
    }
}

/// `field: `, or nothing when the field is empty.
struct FieldPrefix<'a>(&'a str);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

/// ` (Kind namespace/name)`, or nothing.
struct ObjectSuffix<'a>(&'a Option<String>);

impl fmt::Display for ObjectSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(o) => write!(f, " ({o})"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_object_and_field() {
        let e = ConfigError::invalid("default/web", "spec.ports[1].port", "70000 is out of range");
        assert_eq!(
            e.to_string(),
            "default/web: spec.ports[1].port: 70000 is out of range"
        );
        let e = ConfigError::invalid("default/web", "", "no ports");
        assert_eq!(e.to_string(), "default/web: no ports");
        let e = ConfigError::Document {
            file: "app.yaml".into(),
            document: 2,
            object: Some("Service default/web".into()),
            field: "items[1]".into(),
            message: "bad".into(),
        };
        assert_eq!(
            e.to_string(),
            "app.yaml: document 2 (Service default/web): items[1]: bad"
        );
        assert_eq!(e.object(), "app.yaml");
        assert_eq!(e.field(), "items[1]");
    }
}
