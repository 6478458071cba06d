//! A deterministic synthetic implicit-feedback set that a model can learn and popularity alone
//! cannot: each user picks items by a latent-factor affinity plus a Zipf popularity skew plus
//! Gumbel noise (the Gumbel top-k trick: sampling without replacement in proportion to
//! `exp(affinity + popularity)` when `noise` is 1). Pick order is random, so leave-one-out holds
//! out a random pick.

use distill_rt::rng::Rng;

use crate::ratings::Rating;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Number of users.
    pub users: usize,
    /// Number of items.
    pub items: usize,
    /// Items each user picks.
    pub per_user: usize,
    /// Latent factors.
    pub factors: usize,
    /// Zipf exponent of item popularity (0: none).
    pub popularity: f64,
    /// Scale of the Gumbel noise (0: each user picks their top items).
    pub noise: f64,
    /// Seed of everything.
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            users: 300,
            items: 400,
            per_user: 30,
            factors: 8,
            popularity: 1.0,
            noise: 1.0,
            seed: 0,
        }
    }
}

/// Standard deviation of a user-item affinity.
const AFFINITY_SCALE: f64 = 2.5;

/// The ratings of `spec`: one (5 stars) per pick, timestamps in pick order.
pub fn generate(spec: &Spec) -> Vec<Rating> {
    let mut rng = Rng::derive(spec.seed, "recsys-synthetic");
    let f = spec.factors;
    let normal = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<_>>();
    let items = normal(&mut rng, spec.items * f);
    let users = normal(&mut rng, spec.users * f);
    let mut ranks: Vec<usize> = (1..=spec.items).collect();
    rng.shuffle(&mut ranks);
    let popularity: Vec<f64> = ranks
        .iter()
        .map(|&r| -spec.popularity * (r as f64).ln())
        .collect();
    let scale = AFFINITY_SCALE / (f as f64).sqrt();
    let mut ratings = Vec::with_capacity(spec.users * spec.per_user);
    for u in 0..spec.users {
        let p = &users[u * f..(u + 1) * f];
        let row: Vec<f64> = (0..spec.items)
            .map(|i| {
                let q = &items[i * f..(i + 1) * f];
                scale * p.iter().zip(q).map(|(a, b)| a * b).sum::<f64>() + popularity[i]
            })
            .collect();
        let mut noisy: Vec<(f64, usize)> = row
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let gumbel = -(-(1.0 - rng.uniform()).ln()).ln();
                (v + spec.noise * gumbel, i)
            })
            .collect();
        noisy.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut picks: Vec<usize> = noisy[..spec.per_user].iter().map(|&(_, i)| i).collect();
        rng.shuffle(&mut picks);
        for (t, i) in picks.into_iter().enumerate() {
            ratings.push(Rating {
                user: u as u64,
                item: i as u64,
                rating: 5.0,
                timestamp: t as i64,
            });
        }
    }
    ratings
}
