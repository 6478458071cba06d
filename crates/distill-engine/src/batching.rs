//! How samples are grouped into batches. Training batches come from a seeded shuffle; when the
//! dataset reports sample lengths (text padded to its batch's longest sentence), each window of
//! [`BUCKET`] batches is sorted by length before it is cut, and the batches are shuffled again,
//! so that a batch holds sentences of similar length and little padding (as torchtext's
//! `BucketIterator`). Evaluation runs in length order; its results do not depend on the order.

use distill_rt::rng::Rng;

/// Batches per window sorted by length.
pub const BUCKET: usize = 50;

/// One epoch's training batches of `n` samples, from `rng`.
pub fn training_batches(
    n: usize,
    lengths: Option<&[usize]>,
    batch_size: usize,
    rng: &mut Rng,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let Some(lengths) = lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut batches = Vec::with_capacity(n.div_ceil(batch_size));
    for window in order.chunks_mut(batch_size * BUCKET) {
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// The order in which evaluation (and the teacher cache) visit `n` samples: by length when
/// known (a stable sort), else `0..n`.
pub fn evaluation_order(n: usize, lengths: Option<&[usize]>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if let Some(lengths) = lengths {
        order.sort_by_key(|&i| lengths[i]);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_lengths_batches_are_the_shuffled_order_cut() {
        let batches = training_batches(10, None, 4, &mut Rng::new(1));
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn with_lengths_batches_hold_similar_lengths_and_every_sample_once() {
        let n = 1000;
        let lengths: Vec<usize> = (0..n).map(|i| (i * 7919) % 60 + 1).collect();
        let batches = training_batches(n, Some(&lengths), 10, &mut Rng::new(3));
        assert_eq!(batches.len(), 100);
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        // Padding: the sum over batches of (longest * size) against a random cut's.
        let padded = |bs: &[Vec<usize>]| -> usize {
            bs.iter()
                .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap_or(0) * b.len())
                .sum()
        };
        let random = training_batches(n, None, 10, &mut Rng::new(3));
        assert!(padded(&batches) * 3 < padded(&random) * 2);
        // Same seed, same batches.
        assert_eq!(
            batches,
            training_batches(n, Some(&lengths), 10, &mut Rng::new(3))
        );
    }

    #[test]
    fn evaluation_visits_every_sample_by_length() {
        let lengths = [3, 1, 2, 1];
        assert_eq!(evaluation_order(4, Some(&lengths)), [1, 3, 2, 0]);
        assert_eq!(evaluation_order(3, None), [0, 1, 2]);
    }
}
