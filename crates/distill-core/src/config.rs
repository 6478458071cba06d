//! Configuration tables: what an experiment file says about one dataset, model or strategy.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// A configuration table as read from an experiment file (already merged by the host).
pub type Config = serde_json::Value;

/// Deserialises `config` into `T`. `T` should carry `#[serde(deny_unknown_fields)]` so that a
/// misspelt key is an error; `owner` names what the table configures in the message, and the
/// error names the key path that is wrong (`temperature`, `layers[2].width`).
pub fn parse<T: DeserializeOwned>(owner: &str, config: &Config) -> Result<T> {
    let empty = Config::Object(Default::default());
    let config = if config.is_null() { &empty } else { config };
    serde_path_to_error::deserialize(config).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // A missing field is reported at its parent; name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let key = match (path.as_str(), missing) {
            (".", Some(field)) => field.to_string(),
            (parent, Some(field)) => format!("{parent}.{field}"),
            (path, None) => path.to_string(),
        };
        Error::Config {
            owner: owner.to_string(),
            key,
            message,
        }
    })
}

/// The default configuration `T` as a table, for [`crate::StrategyFactory::defaults`] and its
/// siblings: one source for the defaults, the `Default` impl that parsing uses.
pub fn defaults_of<T: Default + Serialize>() -> Config {
    serde_json::to_value(T::default()).unwrap_or(Config::Null)
}

/// The value listings show for a key that has no default.
pub const REQUIRED: &str = "<required>";

/// Like [`defaults_of`] for a `T` with required keys: each `(key, example)` is parsed with a
/// placeholder of the right type, then listed as [`REQUIRED`].
pub fn defaults_with_required<T: DeserializeOwned + Serialize>(
    required: &[(&str, Config)],
) -> Config {
    let table: serde_json::Map<String, Config> = required
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let Ok(parsed) = serde_json::from_value::<T>(Config::Object(table)) else {
        return Config::Null;
    };
    let mut out = serde_json::to_value(parsed).unwrap_or(Config::Null);
    if let Some(map) = out.as_object_mut() {
        for (k, _) in required {
            map.insert(k.to_string(), Config::String(REQUIRED.into()));
        }
    }
    out
}

/// Parses a table whose keys belong to two structs: those in `shared_keys` into `S` (options
/// several factories share), the rest into `T`; each rejects keys it does not know, so a
/// misspelt key is still an error naming it.
pub fn parse_split<T: DeserializeOwned, S: DeserializeOwned>(
    owner: &str,
    config: &Config,
    shared_keys: &[&str],
) -> Result<(T, S)> {
    let mut own = serde_json::Map::new();
    let mut shared = serde_json::Map::new();
    match config {
        Config::Null => {}
        Config::Object(map) => {
            for (k, v) in map {
                let to = if shared_keys.contains(&k.as_str()) {
                    &mut shared
                } else {
                    &mut own
                };
                to.insert(k.clone(), v.clone());
            }
        }
        _ => return Err(Error::config(owner, ".", "must be a table")),
    }
    Ok((
        parse(owner, &Config::Object(own))?,
        parse(owner, &Config::Object(shared))?,
    ))
}

/// Checks that every `(key, value)` is above zero (widths, counts, sizes), naming the first key
/// that is not.
pub fn require_positive(owner: &str, values: &[(&str, usize)]) -> Result<()> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err(Error::config(owner, *key, "must be > 0")),
        None => Ok(()),
    }
}

/// Checks that every `(key, value)` is finite and above zero (temperatures, learning rates,
/// scales), naming the first that is not.
pub fn require_scales(owner: &str, values: &[(&str, f64)]) -> Result<()> {
    match values.iter().find(|(_, v)| !(*v > 0.0 && v.is_finite())) {
        Some((key, v)) => Err(Error::config(owner, *key, format!("must be > 0, got {v}"))),
        None => Ok(()),
    }
}

/// Checks that every `(key, weight)` is finite and not negative (loss weights), naming the
/// first that is not.
pub fn require_weights(owner: &str, values: &[(&str, f64)]) -> Result<()> {
    match values.iter().find(|(_, w)| !(*w >= 0.0 && w.is_finite())) {
        Some((key, w)) => Err(Error::config(owner, *key, format!("must be >= 0, got {w}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Kd {
        alpha: f64,
        temperature: f64,
    }
    impl Default for Kd {
        fn default() -> Self {
            Kd {
                alpha: 0.5,
                temperature: 4.0,
            }
        }
    }

    #[test]
    fn defaults_fill_missing_keys_and_null_means_empty() -> Result<()> {
        let k: Kd = parse("strategy kd", &serde_json::json!({"alpha": 0.1}))?;
        assert_eq!(
            k,
            Kd {
                alpha: 0.1,
                temperature: 4.0
            }
        );
        let k: Kd = parse("strategy kd", &Config::Null)?;
        assert_eq!(k, Kd::default());
        Ok(())
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse::<Kd>("strategy kd", &serde_json::json!({"temprature": 2.0}));
        match e {
            Err(Error::Config { owner, key, .. }) => {
                assert_eq!(owner, "strategy kd");
                assert_eq!(key, "temprature");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[derive(serde::Deserialize, Debug, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Shared {
        seed: u64,
    }

    #[test]
    fn split_tables_fill_both_structs_and_still_name_unknown_keys() -> Result<()> {
        let (k, s): (Kd, Shared) = parse_split(
            "dataset x",
            &serde_json::json!({"alpha": 0.2, "seed": 3}),
            &["seed"],
        )?;
        assert_eq!((k.alpha, s.seed), (0.2, 3));
        match parse_split::<Kd, Shared>("dataset x", &serde_json::json!({"sed": 3}), &["seed"]) {
            Err(Error::Config { key, .. }) => assert_eq!(key, "sed"),
            other => panic!("expected a config error, got {other:?}"),
        }
        Ok(())
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Required {
        #[allow(dead_code)]
        feature: String,
    }

    #[test]
    fn missing_key_is_named() {
        match parse::<Required>("strategy x", &serde_json::json!({})) {
            Err(Error::Config { key, .. }) => assert_eq!(key, "feature"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = parse::<Kd>(
            "strategy kd",
            &serde_json::json!({"alpha": 0.5, "temperature": "hot"}),
        );
        match e {
            Err(Error::Config { key, message, .. }) => {
                assert_eq!(key, "temperature");
                assert!(message.contains("expected f64"), "{message}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
