//! The registrar: plugins register their factories by name; the host looks them up.

use std::collections::BTreeMap;

use crate::data::DatasetFactory;
use crate::guard;
use crate::model::ModelFactory;
use crate::strategy::StrategyFactory;
use crate::{Config, Error, Result};

/// Every dataset, model and strategy factory known to the process, by name.
///
/// Factories are wrapped at registration so that a panic in any of their methods, or in any method
/// of an object they build, becomes [`Error::Panic`].
#[derive(Default)]
pub struct Registrar {
    datasets: BTreeMap<String, Entry<dyn DatasetFactory>>,
    models: BTreeMap<String, Entry<dyn ModelFactory>>,
    strategies: BTreeMap<String, Entry<dyn StrategyFactory>>,
    /// The plugin whose `register` is running (set by the host).
    current_origin: String,
}

struct Entry<T: ?Sized> {
    origin: String,
    factory: Box<T>,
}

/// One registered name, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// `dataset`, `model` or `strategy`.
    pub kind: &'static str,
    /// The registered name.
    pub name: String,
    /// The factory's one-line summary.
    pub summary: String,
    /// The plugin file (or `builtin`) it came from.
    pub origin: String,
    /// Its configuration keys with their defaults (`Config::Null`: not described).
    pub defaults: Config,
}

impl Registrar {
    /// An empty registrar.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the origin recorded for factories registered from now on (the host calls this with
    /// the plugin's path before calling its `register`).
    pub fn set_origin(&mut self, origin: impl Into<String>) {
        self.current_origin = origin.into();
    }

    /// Registers a dataset factory under `name`.
    pub fn dataset(&mut self, name: &str, factory: impl DatasetFactory + 'static) -> Result<()> {
        let factory = guard::dataset_factory(name, Box::new(factory))?;
        insert(
            &mut self.datasets,
            "dataset",
            name,
            &self.current_origin,
            factory,
        )
    }

    /// Registers a model factory under `name`.
    pub fn model(&mut self, name: &str, factory: impl ModelFactory + 'static) -> Result<()> {
        let factory = guard::model_factory(name, Box::new(factory))?;
        insert(
            &mut self.models,
            "model",
            name,
            &self.current_origin,
            factory,
        )
    }

    /// Registers a strategy factory under `name`.
    pub fn strategy(&mut self, name: &str, factory: impl StrategyFactory + 'static) -> Result<()> {
        let factory = guard::strategy_factory(name, Box::new(factory))?;
        insert(
            &mut self.strategies,
            "strategy",
            name,
            &self.current_origin,
            factory,
        )
    }

    /// The dataset factory named `name`.
    pub fn get_dataset(&self, name: &str) -> Result<&dyn DatasetFactory> {
        lookup(&self.datasets, "dataset", name).map(|e| &*e.factory)
    }

    /// The model factory named `name`.
    pub fn get_model(&self, name: &str) -> Result<&dyn ModelFactory> {
        lookup(&self.models, "model", name).map(|e| &*e.factory)
    }

    /// The strategy factory named `name`.
    pub fn get_strategy(&self, name: &str) -> Result<&dyn StrategyFactory> {
        lookup(&self.strategies, "strategy", name).map(|e| &*e.factory)
    }

    /// Every registered name, datasets first, each group sorted.
    pub fn list(&self) -> Vec<Registered> {
        let mut out = Vec::new();
        for (name, e) in &self.datasets {
            out.push(registered(
                "dataset",
                name,
                e.factory.summary(),
                e.factory.defaults(),
                &e.origin,
            ));
        }
        for (name, e) in &self.models {
            out.push(registered(
                "model",
                name,
                e.factory.summary(),
                e.factory.defaults(),
                &e.origin,
            ));
        }
        for (name, e) in &self.strategies {
            out.push(registered(
                "strategy",
                name,
                e.factory.summary(),
                e.factory.defaults(),
                &e.origin,
            ));
        }
        out
    }
}

fn registered(
    kind: &'static str,
    name: &str,
    summary: &str,
    defaults: Config,
    origin: &str,
) -> Registered {
    Registered {
        kind,
        name: name.into(),
        summary: summary.into(),
        origin: origin.into(),
        defaults,
    }
}

fn insert<T: ?Sized>(
    map: &mut BTreeMap<String, Entry<T>>,
    kind: &'static str,
    name: &str,
    origin: &str,
    factory: Box<T>,
) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
        return Err(Error::Invalid(format!(
            "{kind} name `{name}` must be non-empty without spaces"
        )));
    }
    if map.contains_key(name) {
        return Err(Error::Duplicate {
            kind,
            name: name.to_string(),
        });
    }
    map.insert(
        name.to_string(),
        Entry {
            origin: origin.to_string(),
            factory,
        },
    );
    Ok(())
}

fn lookup<'a, T: ?Sized>(
    map: &'a BTreeMap<String, Entry<T>>,
    kind: &'static str,
    name: &str,
) -> Result<&'a Entry<T>> {
    map.get(name).ok_or_else(|| Error::Unknown {
        kind,
        name: name.to_string(),
        suggestion: suggest(name, map.keys().map(String::as_str))
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_else(|| {
                let known: Vec<_> = map.keys().map(String::as_str).collect();
                format!(" (known: {})", known.join(", "))
            }),
    })
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a typo.
pub fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        let names = ["kd", "feature-mse", "baseline"];
        assert_eq!(
            suggest("featur-mse", names.into_iter()),
            Some("feature-mse")
        );
        assert_eq!(suggest("basline", names.into_iter()), Some("baseline"));
        assert_eq!(suggest("contrastive", names.into_iter()), None);
    }
}
