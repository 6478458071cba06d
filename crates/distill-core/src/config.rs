//! Configuration tables: what an experiment file says about one dataset, model or strategy.

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// A configuration table as read from an experiment file (already merged by the host).
pub type Config = serde_json::Value;

/// Deserialises `config` into `T`. `T` should carry `#[serde(deny_unknown_fields)]` so that a
/// misspelt key is an error; `owner` names what the table configures in the message.
pub fn parse<T: DeserializeOwned>(owner: &str, config: &Config) -> Result<T> {
    let config = if config.is_null() {
        &Config::Object(Default::default())
    } else {
        config
    };
    T::deserialize(config).map_err(|e| {
        let message = e.to_string();
        let key = message
            .split('`')
            .nth(1)
            .filter(|_| {
                message.starts_with("unknown field") || message.starts_with("missing field")
            })
            .unwrap_or("")
            .to_string();
        Error::Config {
            owner: owner.to_string(),
            key,
            message,
        }
    })
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
}
