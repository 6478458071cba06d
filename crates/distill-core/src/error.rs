//! The one error type of the plugin API.

/// Result alias used across the plugin API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the plugin API, a plugin or the code around it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration value is missing, of the wrong type or out of range.
    #[error("{owner}: config key `{key}`: {message}")]
    Config {
        /// What the configuration is for (`strategy kd`, `model vision.lenet`).
        owner: String,
        /// The key (or key path) that is wrong.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A model output lacks a feature a strategy needs.
    #[error("{owner} needs feature `{name}` from the {side}, which exposes only [{available}]")]
    MissingFeature {
        /// The strategy that asked for it.
        owner: String,
        /// `student` or `teacher`.
        side: &'static str,
        /// The missing feature name.
        name: String,
        /// The feature names that do exist, comma separated.
        available: String,
    },
    /// A name is not registered.
    #[error("no {kind} named `{name}` is registered{suggestion}")]
    Unknown {
        /// `dataset`, `model` or `strategy`.
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// `; did you mean `x`?` or empty.
        suggestion: String,
    },
    /// A name was registered twice.
    #[error("{kind} `{name}` is registered twice")]
    Duplicate {
        /// `dataset`, `model` or `strategy`.
        kind: &'static str,
        /// The name registered twice.
        name: String,
    },
    /// Plugin code panicked; the panic was contained.
    #[error("plugin code panicked in {entry}: {message}")]
    Panic {
        /// The entry point (`strategy kd: loss`).
        entry: String,
        /// The panic message.
        message: String,
    },
    /// A data file is missing, malformed or truncated.
    #[error("data file {path}: {message}")]
    Data {
        /// The file (or folder).
        path: String,
        /// What is wrong with it, with the fix where one is known.
        message: String,
    },
    /// An invariant of the inputs does not hold (shapes, ranges).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A data-file error for `path`.
    pub fn data(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.as_ref().display().to_string(),
            message: message.into(),
        }
    }

    /// A configuration error for `owner` at `key`.
    pub fn config(
        owner: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            owner: owner.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}
