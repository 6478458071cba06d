//! Batch normalisation in training mode as one op on `[batch, channels, spatial...]` as it
//! lies: statistics per channel over the batch and the positions, then `* gamma + beta`, an
//! optional fused ReLU, and a fused backward pass. It hands the batch's statistics back for
//! the running averages. Group normalisation's kernel computes the same with a group per
//! channel, but only on channels-first data: the transposes there and back, and a second pass
//! for the statistics, took a fifth of a CIFAR ResNet's training step.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::dot;
use super::{Float, contiguous, lane_sum, norm_dims, norm_grads, rows_per_task, same_float};
use crate::{Error, Result};

/// The mean and biased variance per channel of the batch one forward pass normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchStats {
    /// Mean per channel.
    pub mean: Vec<f64>,
    /// Biased variance per channel (over `count` values).
    pub var: Vec<f64>,
    /// Values per channel: the batch size times the positions.
    pub count: usize,
}

/// The forward op. Its statistics are kept for the backward pass and for the caller.
#[derive(Clone)]
struct BatchNormOp {
    eps: f64,
    /// Whether a ReLU follows (fused: its mask is recomputed from `x` in the backward pass).
    relu: bool,
    stats: Arc<OnceLock<BatchStats>>,
}

/// `per_plane[n * channels + c]` summed over `n` for each channel, in sample order (the same
/// sums however the pool ran the planes).
fn per_channel<T: Float>(per_plane: &[T], channels: usize) -> Vec<T> {
    let mut sums = vec![T::default(); channels];
    for planes in per_plane.chunks_exact(channels) {
        for (s, &v) in sums.iter_mut().zip(planes) {
            *s += v;
        }
    }
    sums
}

/// Each channel's mean and `1 / sqrt(var + eps)`, in the data's precision; the forward and
/// backward passes take them from here, so both use the same bits.
fn mean_rstd<T: Float>(stats: &BatchStats, eps: f64) -> Vec<(T, T)> {
    let eps = T::from_f64(eps);
    stats
        .mean
        .iter()
        .zip(&stats.var)
        .map(|(&m, &v)| (T::from_f64(m), T::ONE / (T::from_f64(v) + eps).sqrt()))
        .collect()
}

impl BatchNormOp {
    fn forward<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T], shape: &Shape) -> Vec<T> {
        let (_, channels, spatial) = norm_dims(shape);
        let count = x.len() / channels.max(1);
        let n = T::from_f64(count as f64);
        let min_len = rows_per_task(spatial);
        let planes = || x.par_chunks(spatial).with_min_len(min_len);
        let sums: Vec<T> = planes().map(|p| wide!(lane_sum(p, |v| v))).collect();
        let mean: Vec<T> = per_channel(&sums, channels)
            .into_iter()
            .map(|s| s / n)
            .collect();
        let squares: Vec<T> = planes()
            .enumerate()
            .map(|(i, p)| {
                let m = mean[i % channels];
                wide!(lane_sum(p, |v| (v - m) * (v - m)))
            })
            .collect();
        let var: Vec<T> = per_channel(&squares, channels)
            .into_iter()
            .map(|s| s / n)
            .collect();
        let stats = BatchStats {
            mean: mean.iter().map(|m| m.to_f64()).collect(),
            var: var.iter().map(|v| v.to_f64()).collect(),
            count,
        };
        let norm = mean_rstd::<T>(&stats, self.eps);
        let relu = self.relu;
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(spatial)
            .zip(x.par_chunks(spatial))
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(i, (ys, xs))| {
                let c = i % channels;
                let (mean, rstd) = norm[c];
                let w = gamma[c] * rstd;
                let shift = beta[c] - mean * w;
                wide!({
                    for (&xv, yv) in xs.iter().zip(ys.iter_mut()) {
                        let v = xv * w + shift;
                        *yv = if relu && v < T::default() {
                            T::default()
                        } else {
                            v
                        };
                    }
                })
            });
        // Set once: each call of `batch_norm` makes its own op.
        let _ = self.stats.set(stats);
        out
    }

    /// `dx`, then `dgamma` and `dbeta` (`channels` each), in one vector.
    fn backward<T: Float>(
        &self,
        stats: &BatchStats,
        x: &[T],
        (gamma, beta): (&[T], &[T]),
        dy: &[T],
        shape: &Shape,
    ) -> Vec<T> {
        let (_, channels, spatial) = norm_dims(shape);
        let min_len = rows_per_task(spatial);
        let mut out = vec![T::default(); x.len() + 2 * channels];
        let (dx, params) = out.split_at_mut(x.len());
        let norm = mean_rstd::<T>(stats, self.eps);
        let relu = self.relu;
        // dxhat = dy * gamma; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
        // First each plane's upstream gradient, masked where the fused ReLU's input was <= 0,
        // goes into dx, with its sums: sum(d) and sum(d * x).
        let sums: Vec<(T, T)> = dx
            .par_chunks_mut(spatial)
            .zip(x.par_chunks(spatial).zip(dy.par_chunks(spatial)))
            .enumerate()
            .with_min_len(min_len)
            .map(|(i, (dxs, (xs, dys)))| {
                let c = i % channels;
                let (mean, rstd) = norm[c];
                // The forward pass's scale and shift, so the mask is the forward's exactly.
                let w = gamma[c] * rstd;
                let b = beta[c] - mean * w;
                wide!({
                    for ((o, &xv), &dv) in dxs.iter_mut().zip(xs).zip(dys) {
                        let off = relu && xv * w + b <= T::default();
                        *o = if off { T::default() } else { dv };
                    }
                    (lane_sum(dxs, |v| v), dot(dxs, xs))
                })
            })
            .collect();
        let (sd, sdx): (Vec<T>, Vec<T>) = sums.into_iter().unzip();
        let (sd, sdx) = (per_channel(&sd, channels), per_channel(&sdx, channels));
        let n = T::from_f64(stats.count as f64);
        // Per channel: dgamma = sum(d * xhat), dbeta = sum(d), and the two means of dx.
        let mut terms = Vec::with_capacity(channels);
        for c in 0..channels {
            let (mean, rstd) = norm[c];
            let d_xhat = rstd * (sdx[c] - mean * sd[c]);
            params[c] = d_xhat;
            params[channels + c] = sd[c];
            terms.push((mean, rstd, gamma[c] * sd[c] / n, gamma[c] * d_xhat / n));
        }
        dx.par_chunks_mut(spatial)
            .zip(x.par_chunks(spatial))
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(i, (dxs, xs))| {
                let c = i % channels;
                let (mean, rstd, m1, m2) = terms[c];
                let w = gamma[c];
                wide!({
                    for (o, &xv) in dxs.iter_mut().zip(xs) {
                        *o = rstd * (*o * w - m1 - (xv - mean) * rstd * m2);
                    }
                })
            });
        out
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape();
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, g, b| self
            .forward(x, g, b, shape));
        Ok((out, shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        norm_grads(x, gamma, beta, grad, &BatchNormGrad(self.clone()))
    }
}

/// The backward pass of [`BatchNormOp`] on `(x, [gamma, beta], dy)`: `dx`, `dgamma`, `dbeta`
/// packed into one vector.
struct BatchNormGrad(BatchNormOp);

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape();
        let channels = shape.dims()[1];
        if l2.shape().elem_count() != 2 * channels || l3.shape() != shape {
            candle_core::bail!(
                "{}: parameters {:?} and gradient {:?} for input {shape:?}",
                self.name(),
                l2.shape(),
                l3.shape()
            );
        }
        let Some(stats) = self.0.stats.get() else {
            candle_core::bail!("{}: no statistics (backward before forward)", self.name());
        };
        let out = on_slices!(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, p: &[_], d| self.0.backward(stats, x, p.split_at(channels), d, shape)
        );
        let len = shape.elem_count() + 2 * channels;
        Ok((out, Shape::from(len)))
    }
}

/// Batch normalisation in training mode (Ioffe & Szegedy 2015) of `x` (`[batch, channels,
/// spatial...]`), as PyTorch's `BatchNorm2d` computes it: mean and biased variance per channel
/// over the batch and every position, then `* gamma + beta` per channel, then a ReLU when
/// `relu`. Returns the output and the batch's statistics (for the running averages).
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let dims = x.dims();
    let channels = dims.get(1).copied().unwrap_or(0);
    let count = x.elem_count() / channels.max(1);
    if dims.len() < 2 || gamma.dims() != [channels] || beta.dims() != [channels] {
        return Err(Error::Invalid(format!(
            "batch_norm: gamma {:?} and beta {:?} do not fit {dims:?} (channels second)",
            gamma.dims(),
            beta.dims()
        )));
    }
    if count < 2 {
        return Err(Error::Invalid(format!(
            "batch norm in training mode needs more than one value per channel, got input {dims:?}"
        )));
    }
    same_float("batch_norm", &[x, gamma, beta])?;
    let stats = Arc::new(OnceLock::new());
    let op = BatchNormOp {
        eps,
        relu,
        stats: Arc::clone(&stats),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = stats
        .get()
        .cloned()
        .ok_or_else(|| Error::Invalid("batch_norm: the op kept no statistics".into()))?;
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{assert_finite_differences, assert_same, seq};
    use crate::kernels::{group_norm, group_norm_relu};
    use crate::testing::max_abs_difference;
    use candle_core::DType;

    /// Group normalisation with a group per channel on the channels-first transpose: the
    /// independent form (another kernel, other loops).
    fn by_group_norm(x: &[Tensor], relu: bool) -> Result<Tensor> {
        let dims = x[0].dims().to_vec();
        let channels = dims[1];
        let per_channel = x[0]
            .transpose(0, 1)?
            .contiguous()?
            .reshape((1, channels, ()))?;
        let norm = if relu { group_norm_relu } else { group_norm };
        let y = norm(&per_channel, &x[1], &x[2], channels, 1e-5)?;
        let mut swapped = dims.clone();
        swapped.swap(0, 1);
        Ok(y.reshape(swapped)?.transpose(0, 1)?.contiguous()?)
    }

    #[test]
    fn batch_norm_equals_group_norm_per_channel_and_finite_differences() -> Result<()> {
        // 3 samples, 2 channels, 3x5 positions: a vector lane and a tail per plane.
        let inputs = [
            seq(&[3, 2, 3, 5], 2.0)?,
            (seq(&[2], 0.5)? + 1.0)?,
            seq(&[2], 0.3)?,
        ];
        let ours = |relu| {
            move |x: &[Tensor]| -> Result<Tensor> {
                Ok(batch_norm(&x[0], &x[1], &x[2], 1e-5, relu)?.0)
            }
        };
        for relu in [false, true] {
            let theirs = |x: &[Tensor]| by_group_norm(x, relu);
            assert_same(
                &ours(relu),
                &theirs,
                &inputs,
                &format!("batch norm, relu {relu}"),
            )?;
        }
        // Without the ReLU: with it, moving one input moves the mean, and with it the kink of
        // every output, past the differences' step.
        let w = seq(&[3, 2, 3, 5], 0.7)?;
        let plain = ours(false);
        assert_finite_differences(
            &|x: &[Tensor]| Ok((plain(x)? * &w)?.sqr()?.sum_all()?),
            &inputs,
            "batch norm",
        )?;
        Ok(())
    }

    #[test]
    fn batch_norm_returns_the_batch_statistics() -> Result<()> {
        let x = seq(&[3, 2, 4], 1.0)?;
        let (_, stats) = batch_norm(&x, &seq(&[2], 1.0)?, &seq(&[2], 0.1)?, 1e-5, false)?;
        let values: Vec<Vec<f64>> = x.transpose(0, 1)?.flatten_from(1)?.to_vec2()?;
        for (c, v) in values.iter().enumerate() {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
            assert!((stats.mean[c] - mean).abs() < 1e-14, "channel {c} mean");
            assert!((stats.var[c] - var).abs() < 1e-14, "channel {c} var");
        }
        assert_eq!(stats.count, 12);
        Ok(())
    }

    #[test]
    fn batch_norm_in_f32_matches_f64() -> Result<()> {
        let (x, g, b) = (seq(&[16, 8, 6, 6], 3.0)?, seq(&[8], 1.0)?, seq(&[8], 0.3)?);
        let exact = batch_norm(&x, &g, &b, 1e-5, true)?.0;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let ours = batch_norm(&f32s(&x)?, &f32s(&g)?, &f32s(&b)?, 1e-5, true)?.0;
        assert!(max_abs_difference(&ours.to_dtype(DType::F64)?, &exact)? < 1e-5);
        Ok(())
    }

    #[test]
    fn batch_norm_refuses_one_value_per_channel_and_other_widths() -> Result<()> {
        let (g, b) = (seq(&[2], 1.0)?, seq(&[2], 0.1)?);
        assert!(batch_norm(&seq(&[1, 2], 1.0)?, &g, &b, 1e-5, false).is_err());
        assert!(batch_norm(&seq(&[3, 4], 1.0)?, &g, &b, 1e-5, false).is_err());
        Ok(())
    }
}
