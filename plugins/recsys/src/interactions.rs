//! From ratings to the implicit-feedback protocol of NCF (He et al. 2017): a rating at or above
//! a threshold is a positive; items, then users, with too few positives are dropped (one pass
//! each); ids are renumbered densely in raw-id order; each user's last positive by time is the
//! test item, the one before it the validation item, the rest train (leave-one-out); evaluation
//! ranks each held-out item among negatives sampled once per seed.

use std::collections::{BTreeMap, HashSet};

use distill_rt::rng::Rng;
use distill_rt::{Error, Result};

use crate::ratings::Rating;

/// Users' positives split by leave-one-out, with dense ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Interactions {
    /// Number of users.
    pub users: usize,
    /// Number of items.
    pub items: usize,
    /// Each user's training positives, oldest first.
    pub train: Vec<Vec<u32>>,
    /// Each user's validation item (second to last positive).
    pub validation: Vec<u32>,
    /// Each user's test item (last positive).
    pub test: Vec<u32>,
}

/// How ratings become positives.
#[derive(Clone, Copy, Debug)]
pub struct Implicit {
    /// A rating at or above this is a positive.
    pub threshold: f32,
    /// Items with fewer positives are dropped first.
    pub min_item_positives: usize,
    /// Then users with fewer positives (at least 3: train, validation, test).
    pub min_user_positives: usize,
}

impl Default for Implicit {
    /// 4 stars or more; items, then users, with fewer than 5 positives dropped.
    fn default() -> Self {
        Self {
            threshold: 4.0,
            min_item_positives: 5,
            min_user_positives: 5,
        }
    }
}

/// Applies `rule` to `ratings` and splits each user's positives by time.
pub fn leave_one_out(ratings: &[Rating], rule: Implicit) -> Result<Interactions> {
    let min_user = rule.min_user_positives.max(3);
    // The latest rating of each (user, item) pair decides.
    let mut latest: BTreeMap<(u64, u64), Rating> = BTreeMap::new();
    for r in ratings {
        let keep = latest
            .get(&(r.user, r.item))
            .is_none_or(|old| old.timestamp <= r.timestamp);
        if keep {
            latest.insert((r.user, r.item), *r);
        }
    }
    let positives: Vec<Rating> = latest
        .into_values()
        .filter(|r| r.rating >= rule.threshold)
        .collect();
    let mut per_item: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &positives {
        *per_item.entry(r.item).or_default() += 1;
    }
    let positives: Vec<Rating> = positives
        .into_iter()
        .filter(|r| per_item[&r.item] >= rule.min_item_positives)
        .collect();
    let mut per_user: BTreeMap<u64, Vec<Rating>> = BTreeMap::new();
    for r in positives {
        per_user.entry(r.user).or_default().push(r);
    }
    per_user.retain(|_, v| v.len() >= min_user);
    if per_user.is_empty() {
        return Err(Error::Invalid(format!(
            "no user has {min_user} positives (ratings >= {}) after filtering",
            rule.threshold
        )));
    }
    let item_ids: BTreeMap<u64, u32> = per_user
        .values()
        .flatten()
        .map(|r| r.item)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, raw)| (raw, i as u32))
        .collect();
    let (mut train, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (_, mut rs) in per_user {
        rs.sort_by_key(|r| (r.timestamp, r.item));
        let mut ids: Vec<u32> = rs.iter().map(|r| item_ids[&r.item]).collect();
        let (Some(last), Some(before)) = (ids.pop(), ids.pop()) else {
            return Err(Error::Invalid("a user with fewer than 3 positives".into()));
        };
        test.push(last);
        validation.push(before);
        train.push(ids);
    }
    Ok(Interactions {
        users: train.len(),
        items: item_ids.len(),
        train,
        validation,
        test,
    })
}

impl Interactions {
    /// Every positive of `user` (train, validation and test), sorted: what samplers exclude.
    pub fn positives(&self, user: usize) -> Vec<u32> {
        let mut all = self.train[user].clone();
        all.extend([self.validation[user], self.test[user]]);
        all.sort_unstable();
        all
    }

    /// `count` distinct items per user that are none of that user's positives, drawn from
    /// `seed` and `purpose` (per user, so a user's negatives do not depend on the others).
    pub fn evaluation_negatives(
        &self,
        count: usize,
        seed: u64,
        purpose: &str,
    ) -> Result<Vec<Vec<u32>>> {
        (0..self.users)
            .map(|u| {
                let positives = self.positives(u);
                if self.items < positives.len() + count {
                    return Err(Error::Invalid(format!(
                        "user {u} has {} positives among {} items: fewer than {count} negatives to sample",
                        positives.len(),
                        self.items
                    )));
                }
                let mut rng = Rng::derive(seed, &format!("{purpose}/{u}"));
                Ok(sample_excluding(self.items, &positives, count, &mut rng))
            })
            .collect()
    }
}

/// Up to `count` distinct items, none in `exclude` (sorted), drawn uniformly by `rng` among the
/// `items` ids; fewer when fewer remain.
pub fn sample_excluding(items: usize, exclude: &[u32], count: usize, rng: &mut Rng) -> Vec<u32> {
    let available = items - exclude.len();
    let count = count.min(available);
    if count * 2 > available {
        // Dense: shuffle what remains and take the first `count`.
        let mut rest: Vec<u32> = (0..items as u32)
            .filter(|i| exclude.binary_search(i).is_err())
            .collect();
        rng.shuffle(&mut rest);
        rest.truncate(count);
        return rest;
    }
    let mut seen = HashSet::with_capacity(count);
    let mut chosen = Vec::with_capacity(count);
    while chosen.len() < count {
        let item = rng.below(items) as u32;
        if exclude.binary_search(&item).is_err() && seen.insert(item) {
            chosen.push(item);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratings::{Format, read_ratings};

    fn rule() -> Implicit {
        Implicit {
            threshold: 4.0,
            min_item_positives: 1,
            min_user_positives: 3,
        }
    }

    fn movielens() -> Result<Interactions> {
        let path = distill_host::data_folder("ml-latest-small")?.join("ratings.csv");
        leave_one_out(&read_ratings(&path, Format::Csv)?, rule())
    }

    #[test]
    fn held_out_items_are_each_users_last_positives_and_never_in_training() -> Result<()> {
        let r = |user, item, rating, timestamp| Rating {
            user,
            item,
            rating,
            timestamp,
        };
        let ratings = [
            r(1, 10, 5.0, 100),
            r(1, 11, 4.0, 300),
            r(1, 12, 2.0, 400), // not a positive
            r(1, 13, 4.5, 200),
            r(1, 14, 5.0, 50),
            r(2, 10, 4.0, 10), // two positives only: dropped
            r(2, 11, 4.0, 20),
        ];
        let got = leave_one_out(&ratings, rule())?;
        assert_eq!(got.users, 1);
        // Items 10, 11, 13, 14 -> 0, 1, 2, 3; by time: 14, 10, 13, 11.
        assert_eq!(got.items, 4);
        assert_eq!(got.test, [1]);
        assert_eq!(got.validation, [2]);
        assert_eq!(got.train, [vec![3, 0]]);
        Ok(())
    }

    #[test]
    fn movielens_split_keeps_held_out_items_out_of_training() -> Result<()> {
        let data = movielens()?;
        assert!(
            data.users > 500 && data.users <= 610,
            "{} users",
            data.users
        );
        for u in 0..data.users {
            assert!(!data.train[u].contains(&data.validation[u]));
            assert!(!data.train[u].contains(&data.test[u]));
            assert_ne!(data.validation[u], data.test[u]);
        }
        Ok(())
    }

    #[test]
    fn evaluation_negatives_are_fixed_by_the_seed_and_never_positives() -> Result<()> {
        let data = movielens()?;
        let a = data.evaluation_negatives(99, 0, "test")?;
        assert_eq!(a, data.evaluation_negatives(99, 0, "test")?);
        assert_ne!(a, data.evaluation_negatives(99, 1, "test")?);
        for (u, negatives) in a.iter().enumerate() {
            assert_eq!(negatives.len(), 99);
            let positives = data.positives(u);
            assert!(negatives.iter().all(|i| !positives.contains(i)));
            let distinct: HashSet<_> = negatives.iter().collect();
            assert_eq!(distinct.len(), 99);
        }
        Ok(())
    }
}
