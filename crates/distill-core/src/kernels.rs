//! Custom ops with their own backward pass, where candle's composed form is slow.
//!
//! candle's backward of a broadcast (`broadcast_add(bias)`, `broadcast_mul(scale)`) sums the
//! gradient over the broadcast dimensions; for any dimensions but the trailing ones its CPU
//! reduction walks every element with a division per dimension, on one thread. A bias on
//! `[rows, features]` or on the channels of `[batch, c, h, w]` is reduced over leading
//! dimensions, so every linear layer, convolution and normalisation paid for it (DESIGN.md,
//! "candle traps"). These ops compute the same forward values and reduce their gradients over
//! trailing dimensions and with a matrix product instead. Each is tested against the composed
//! candle ops (values and gradients) and against finite differences.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor,
};

use rayon::prelude::*;

use crate::{Error, Result};

/// Elements per parallel task of the element-wise kernels (small tensors stay on one thread).
const CHUNK: usize = 1 << 15;

/// Rows of `n` elements per parallel task: about [`CHUNK`] elements, at least one row.
fn rows_per_task(n: usize) -> usize {
    (CHUNK / n.max(1)).max(1)
}

/// An error unless every tensor is f32, or every one f64 (what the kernels compute in).
fn same_float(op: &str, tensors: &[&Tensor]) -> Result<()> {
    let dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
    match dtypes.first() {
        Some(first)
            if matches!(first, DType::F32 | DType::F64) && dtypes.iter().all(|d| d == first) =>
        {
            Ok(())
        }
        _ => Err(Error::Invalid(format!(
            "{op} needs f32 or f64 tensors of one dtype, got {dtypes:?}"
        ))),
    }
}

/// Runs `f` on a thread of rayon's global pool and returns its result. The kernels' parallel
/// loops started on a pool thread share their work through its own queue; started on another
/// thread, each loop is handed to the pool while the caller sleeps until it is done: a thread
/// switch per op, and with a pool of one thread (a worker of `--jobs` = cores) every op waits
/// for the pool's only thread. Workers run each job inside it.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` runs its body on a pool thread (the caller's, if it is one).
    rayon::scope(|_| f())
}

/// `wide!(body)`: runs `body` through [`wide`] as a closure forced inline. The compiler may
/// leave a plain closure out of line, and out of line it is compiled for the baseline (SSE2,
/// scalar loops): the batch norm's backward pass ran so, a tenth of a CIFAR ResNet step.
macro_rules! wide {
    ($($body:tt)*) => {
        $crate::kernels::wide(
            #[inline(always)]
            || { $($body)* },
        )
    };
}

/// Runs `f`, compiled for AVX-512 (with AVX2 and FMA) or for AVX2 and FMA, the widest the CPU
/// has (checked once per call; the build's baseline is SSE2, 4 lanes). Called through `wide!`,
/// `f` is inlined into a function with those features, so the loops in its body vectorise 16
/// or 8 lanes wide; a loop `f` hands to rayon runs in rayon's own functions, so call it inside
/// each parallel task, around the loops. Element-wise results do not depend on the width (no
/// loop here reassociates a sum by lanes it chooses itself).
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        use std::arch::is_x86_feature_detected as has;
        // std caches what the CPU has: each check reads an atomic.
        if has!("avx2") && has!("fma") {
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                // SAFETY: the CPU has every feature `avx512` is compiled for (checked above).
                return unsafe { avx512(f) };
            }
            // SAFETY: the CPU has the features `avx2` is compiled for (checked above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// How a per-channel vector (or a pair of rows) combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    Add,
    Mul,
}

/// `x` (contiguous, shape `[outer, channels, inner]` once flattened) combined with a vector of
/// `channels` values along the dimension `dim`.
struct Channel {
    combine: Combine,
    dim: usize,
}

impl Channel {
    /// `(outer, channels, inner)` of `shape` around `self.dim`.
    fn split(&self, shape: &Shape) -> (usize, usize, usize) {
        let dims = shape.dims();
        let outer = dims[..self.dim].iter().product();
        let inner = dims[self.dim + 1..].iter().product();
        (outer, dims[self.dim], inner)
    }

    fn apply<T: Real>(&self, x: &[T], v: &[T], inner: usize) -> Vec<T> {
        let channels = v.len();
        let inner = inner.max(1);
        let mut out = x.to_vec();
        // Whole blocks of `inner` elements per task, about CHUNK elements each.
        let per_task = (CHUNK / inner).max(1) * inner;
        out.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(task, part)| {
                let first = task * per_task / inner;
                for (i, block) in part.chunks_mut(inner).enumerate() {
                    let c = v[(first + i) % channels];
                    match self.combine {
                        Combine::Add => block.iter_mut().for_each(|e| *e += c),
                        Combine::Mul => block.iter_mut().for_each(|e| *e = *e * c),
                    }
                }
            });
        out
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// Runs `f` on the f32 (or f64) slice of a contiguous storage; the result is the storage of
/// `f`'s vector.
macro_rules! on_one {
    ($name:expr, ($s:expr, $l:expr), $f:expr) => {
        match $s {
            CpuStorage::F32(x) => CpuStorage::F32($f(contiguous(x, $l, $name)?)),
            CpuStorage::F64(x) => CpuStorage::F64($f(contiguous(x, $l, $name)?)),
            _ => candle_core::bail!("{}: f32 or f64", $name),
        }
    };
}

/// Runs `f` on the two f32 (or f64) slices of contiguous storages; the result is the storage
/// of `f`'s vector.
macro_rules! on_pair {
    ($name:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), $f:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32($f(contiguous(a, $l1, $name)?, contiguous(b, $l2, $name)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64($f(contiguous(a, $l1, $name)?, contiguous(b, $l2, $name)?))
            }
            _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype", $name),
        }
    };
}

impl CustomOp2 for Channel {
    fn name(&self) -> &'static str {
        match self.combine {
            Combine::Add => "channel-add",
            Combine::Mul => "channel-mul",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, channels, inner) = self.split(l1.shape());
        if l2.shape().elem_count() != channels {
            candle_core::bail!(
                "{}: {} values for {channels} channels",
                self.name(),
                l2.shape().elem_count()
            );
        }
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |x, v| self
            .apply(x, v, inner,));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let channel = |g: &Tensor| channel_sum(g, self.dim).map_err(candle_core::Error::wrap);
        match self.combine {
            Combine::Add => Ok((Some(grad.clone()), Some(channel(&grad)?))),
            Combine::Mul => {
                let gx = grad.apply_op2_no_bwd(
                    v,
                    &Channel {
                        combine: Combine::Mul,
                        dim: self.dim,
                    },
                )?;
                let gv = channel(&(&grad * x.contiguous()?)?)?;
                Ok((Some(gx), Some(gv)))
            }
        }
    }
}

/// The sum of `g` over every dimension but `dim`: trailing dimensions with candle's fast
/// contiguous reduction, leading ones with a matrix product.
pub fn channel_sum(g: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = g.dims();
    if dim >= dims.len() {
        return Err(Error::Invalid(format!(
            "channel_sum: no dimension {dim} in {dims:?}"
        )));
    }
    let outer: usize = dims[..dim].iter().product();
    let inner: usize = dims[dim + 1..].iter().product();
    let channels = dims[dim];
    let mut per_row = g.contiguous()?.reshape((outer, channels, inner))?;
    per_row = if inner > 1 {
        per_row.sum(2)?
    } else {
        per_row.reshape((outer, channels))?
    };
    let ones = Tensor::ones((1, outer), g.dtype(), g.device())?;
    Ok(ones.matmul(&per_row)?.reshape(channels)?)
}

fn channel_op(x: &Tensor, v: &Tensor, dim: usize, combine: Combine) -> Result<Tensor> {
    let rank = x.rank();
    if dim >= rank || v.elem_count() != x.dim(dim)? {
        return Err(Error::Invalid(format!(
            "a per-channel vector of {} values does not fit dimension {dim} of {:?}",
            v.elem_count(),
            x.dims()
        )));
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != v.dtype() {
        return Err(Error::Invalid(format!(
            "per-channel ops need f32 or f64 of one dtype, got {:?} and {:?}",
            x.dtype(),
            v.dtype()
        )));
    }
    let v = v.flatten_all()?.contiguous()?;
    Ok(x.contiguous()?.apply_op2(&v, Channel { combine, dim })?)
}

/// `x + v` with `v` (one value per entry of dimension `dim`) broadcast over the other
/// dimensions: a bias. The same values and gradients as `broadcast_add`, with a fast backward.
pub fn channel_add(x: &Tensor, v: &Tensor, dim: usize) -> Result<Tensor> {
    channel_op(x, v, dim, Combine::Add)
}

/// `x * v` with `v` (one value per entry of dimension `dim`) broadcast over the other
/// dimensions: a per-channel scale. The same values and gradients as `broadcast_mul`, with a
/// fast backward.
pub fn channel_mul(x: &Tensor, v: &Tensor, dim: usize) -> Result<Tensor> {
    channel_op(x, v, dim, Combine::Mul)
}

/// `max(x, 0)`, whose backward pass masks the gradient with the result in one pass (candle's
/// `relu` backward builds a zero tensor, a comparison mask, its float copy and a product).
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn apply<T: Real + PartialOrd>(x: &[T]) -> Vec<T> {
            let mut out = x.to_vec();
            out.par_chunks_mut(CHUNK).for_each(|part| {
                // A select, not a conditional store: it vectorises.
                wide!({
                    part.iter_mut()
                        .for_each(|v| *v = if *v < T::default() { T::default() } else { *v })
                })
            });
            out
        }
        let out = on_one!(self.name(), (s, l), apply);
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &ReluGrad)?))
    }
}

/// The backward pass of [`Relu`] on `(dy, y)`: `dy` where `y > 0`, else 0.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn apply<T: Real + PartialOrd>(g: &[T], y: &[T]) -> Vec<T> {
            let mut out = g.to_vec();
            out.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK))
                .for_each(|(part, ys)| {
                    wide!({
                        part.iter_mut().zip(ys).for_each(|(d, &y)| {
                            *d = if y <= T::default() { T::default() } else { *d }
                        })
                    })
                });
            out
        }
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l2.shape());
        }
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), apply);
        Ok((out, l1.shape().clone()))
    }
}

/// `max(x, 0)` (f32 or f64) with a one-pass backward; the gradient at 0 is 0, as PyTorch's.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Relu)?)
}

/// Group normalisation of a contiguous `[batch, channels, spatial...]` tensor: statistics per
/// sample and group of `channels / groups` channels, then `gamma`, `beta` per channel.
#[derive(Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    /// Whether a ReLU follows (fused: its mask is recomputed from `x` in the backward pass).
    relu: bool,
}

/// `(batch, channels, spatial)` of `shape`: its first, second and the product of the rest.
fn norm_dims(shape: &Shape) -> (usize, usize, usize) {
    let dims = shape.dims();
    (dims[0], dims[1], dims[2..].iter().product())
}

impl GroupNormOp {
    fn forward<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T], shape: &Shape) -> Vec<T> {
        let (_, channels, spatial) = norm_dims(shape);
        let per_channel = channels / self.groups;
        let per_group = per_channel * spatial;
        let eps = T::from_f64(self.eps);
        let mut out = vec![T::default(); x.len()];
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group))
            .enumerate()
            .with_min_len(rows_per_task(per_group))
            .for_each(|(g, (ys, xs))| {
                wide!({
                    let (mean, rstd) = mean_rstd(xs, eps);
                    let first_channel = (g % self.groups) * per_channel;
                    for (c, (xc, yc)) in xs.chunks(spatial).zip(ys.chunks_mut(spatial)).enumerate()
                    {
                        let w = gamma[first_channel + c] * rstd;
                        let shift = beta[first_channel + c] - mean * w;
                        for (&xv, yv) in xc.iter().zip(yc.iter_mut()) {
                            let v = xv * w + shift;
                            *yv = if self.relu && v < T::default() {
                                T::default()
                            } else {
                                v
                            };
                        }
                    }
                })
            });
        out
    }

    /// `dx`, then `dgamma` and `dbeta` (`channels` each), in one vector.
    fn backward<T: Float>(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        dy: &[T],
        shape: &Shape,
    ) -> Vec<T> {
        let (_, channels, spatial) = norm_dims(shape);
        let per_channel = channels / self.groups;
        let per_group = per_channel * spatial;
        let mut out = vec![T::default(); x.len() + 2 * channels];
        let (dx, params) = out.split_at_mut(x.len());
        // Each group writes its own part of dx; each task sums dgamma, dbeta (all channels, in
        // one vector) over its groups: a group per row would otherwise allocate per row.
        let start = || vec![T::default(); 2 * channels];
        // Fixed tasks of `per_task` groups, their partial sums added in task order: the same
        // result however the pool schedules them.
        let per_task = rows_per_task(per_group);
        let span = per_group * per_task;
        let partials: Vec<Vec<T>> = dx
            .par_chunks_mut(span)
            .zip(x.par_chunks(span).zip(dy.par_chunks(span)))
            .enumerate()
            .map(|(t, (dxs, (xs, dys)))| {
                let mut acc = start();
                let groups = dxs
                    .chunks_mut(per_group)
                    .zip(xs.chunks(per_group).zip(dys.chunks(per_group)));
                for (i, (dxs, (xs, dys))) in groups.enumerate() {
                    let g = t * per_task + i;
                    wide!(self.backward_group(g, (xs, dys, dxs), (gamma, beta), &mut acc));
                }
                acc
            })
            .collect();
        let sums = partials.into_iter().fold(start(), add_vectors);
        params.copy_from_slice(&sums);
        out
    }

    /// The backward pass of group `g`: writes its part of dx, adds to `acc` (`[dgamma,
    /// dbeta]`).
    #[inline(always)]
    fn backward_group<T: Float>(
        &self,
        g: usize,
        (xs, dys, dxs): (&[T], &[T], &mut [T]),
        (gamma, beta): (&[T], &[T]),
        acc: &mut [T],
    ) {
        let channels = gamma.len();
        let per_channel = channels / self.groups;
        let spatial = xs.len() / per_channel;
        let (eps, n) = (T::from_f64(self.eps), T::from_f64(xs.len() as f64));
        let (mean, rstd) = mean_rstd(xs, eps);
        let first_channel = (g % self.groups) * per_channel;
        let (dgamma, dbeta) = acc.split_at_mut(channels);
        // dxhat = dy * gamma; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
        // First each channel's upstream gradient, masked where the fused ReLU's input
        // `xhat * w + b` is <= 0, goes into dx, and its sums: sum(d) and sum(d * xhat) =
        // rstd * (sum(d * x) - mean * sum(d)). Plain loops over rows: they vectorise.
        let (mut sum_dxhat, mut sum_dxhat_xhat) = (T::default(), T::default());
        let channels_of = xs.chunks(spatial).zip(dys.chunks(spatial));
        for (c, ((xc, dyc), dxc)) in channels_of.zip(dxs.chunks_mut(spatial)).enumerate() {
            let (w, b) = (gamma[first_channel + c], beta[first_channel + c]);
            for ((o, &xv), &dv) in dxc.iter_mut().zip(xc).zip(dyc) {
                let off = self.relu && (xv - mean) * rstd * w + b <= T::default();
                *o = if off { T::default() } else { dv };
            }
            let sd = lane_sum(dxc, |v| v);
            let sdx = rstd * (matmul::dot(dxc, xc) - mean * sd);
            dgamma[first_channel + c] += sdx;
            dbeta[first_channel + c] += sd;
            sum_dxhat += sd * w;
            sum_dxhat_xhat += sdx * w;
        }
        let (m1, m2) = (sum_dxhat / n, sum_dxhat_xhat / n);
        for (c, (xc, dxc)) in xs.chunks(spatial).zip(dxs.chunks_mut(spatial)).enumerate() {
            let w = gamma[first_channel + c];
            for (o, &xv) in dxc.iter_mut().zip(xc) {
                *o = rstd * (*o * w - m1 - (xv - mean) * rstd * m2);
            }
        }
    }
}

/// The element-wise sum of two partial sums of one length (what parallel tasks return).
fn add_vectors<T: Real>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    a.iter_mut().zip(&b).for_each(|(a, &b)| *a += b);
    a
}

/// The mean of `values` and `1 / sqrt(var + eps)` (biased variance, two passes, in lanes).
#[inline(always)]
fn mean_rstd<T: Float>(values: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(values.len() as f64);
    let mean = lane_sum(values, |v| v) / n;
    let var = lane_sum(values, |v| (v - mean) * (v - mean)) / n;
    (mean, T::ONE / (var + eps).sqrt())
}

/// Runs `f` on the three f32 (or f64) slices of contiguous storages.
macro_rules! on_slices {
    ($name:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), $f:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32($f(
                contiguous(a, $l1, $name)?,
                contiguous(b, $l2, $name)?,
                contiguous(c, $l3, $name)?,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64($f(
                contiguous(a, $l1, $name)?,
                contiguous(b, $l2, $name)?,
                contiguous(c, $l3, $name)?,
            )),
            _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype", $name),
        }
    };
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
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
        norm_grads(x, gamma, beta, grad, &GroupNormGrad(*self))
    }
}

/// `(dx, dgamma, dbeta)` of a per-channel normalisation, from its backward op `grad_op` on
/// `(x, [gamma, beta], dy)`, which packs them into one vector.
fn norm_grads(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    grad: &Tensor,
    grad_op: &impl CustomOp3,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let params = Tensor::cat(&[gamma, beta], 0)?;
    let packed = x.apply_op3_no_bwd(&params, &grad.contiguous()?, grad_op)?;
    let (n, channels) = (x.elem_count(), gamma.elem_count());
    Ok((
        Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
        Some(packed.narrow(0, n, channels)?),
        Some(packed.narrow(0, n + channels, channels)?),
    ))
}

/// The backward pass of [`GroupNormOp`] on `(x, [gamma, beta], dy)`: `dx`, `dgamma`, `dbeta`
/// packed into one vector.
struct GroupNormGrad(GroupNormOp);

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "group-norm-backward"
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
        if l2.shape().elem_count() != 2 * channels {
            candle_core::bail!(
                "{}: parameters {:?} for {channels} channels",
                self.name(),
                l2.shape()
            );
        }
        let out = on_slices!(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, p: &[_], d| {
                let (gamma, beta) = p.split_at(channels);
                self.0.backward(x, gamma, beta, d, shape)
            }
        );
        let len = shape.elem_count() + 2 * shape.dims()[1];
        Ok((out, Shape::from(len)))
    }
}

/// Group normalisation (Wu & He 2018) of `x` (`[batch, channels, spatial...]`): mean and biased
/// variance per sample and group of `channels / groups` channels, then `* gamma + beta` per
/// channel. One pass for the statistics and one for the output, and a fused backward pass, where
/// the composed form makes a dozen full-size tensors. Layer normalisation over the last
/// dimension is the case of one group on `[rows, features]`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    normalise(x, gamma, beta, groups, eps, false)
}

/// [`group_norm`] followed by a ReLU, in one op: the normalised values are never kept (the
/// backward pass recomputes the ReLU's mask from `x`), where `relu(group_norm(..))` keeps both.
pub fn group_norm_relu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    normalise(x, gamma, beta, groups, eps, true)
}

fn normalise(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let channels = dims.get(1).copied().unwrap_or(0);
    if dims.len() < 2
        || groups == 0
        || !channels.is_multiple_of(groups)
        || gamma.elem_count() != channels
        || beta.elem_count() != channels
    {
        return Err(Error::Invalid(format!(
            "group_norm: {groups} groups, gamma {:?} and beta {:?} do not fit {dims:?} (channels second)",
            gamma.dims(),
            beta.dims()
        )));
    }
    same_float("group_norm", &[x, gamma, beta])?;
    Ok(x.contiguous()?.apply_op3(
        &gamma.flatten_all()?.contiguous()?,
        &beta.flatten_all()?.contiguous()?,
        GroupNormOp { groups, eps, relu },
    )?)
}

/// The hyper-parameters of one AdamW step ([`adamw_step`]).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay (the parameter shrinks by `lr * weight_decay` first).
    pub weight_decay: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// The step number, from 1 (bias correction).
    pub step: i32,
}

/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` on the packed moments `[m; v]`.
struct Moments(AdamW);

/// `p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)` from the packed moments.
struct Update(AdamW);

fn slice_mut<'a, T>(
    data: &'a mut [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{what}: the tensor must be contiguous"),
    }
}

impl Moments {
    fn apply<T: Float>(&self, mv: &mut [T], g: &[T]) {
        let h = &self.0;
        let (b1, b2) = (T::from_f64(h.beta1), T::from_f64(h.beta2));
        let (c1, c2) = (T::from_f64(1.0 - h.beta1), T::from_f64(1.0 - h.beta2));
        let (m, v) = mv.split_at_mut(g.len());
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((m, v), g)| {
                wide!({
                    for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                        *m = b1 * *m + c1 * g;
                        *v = b2 * *v + c2 * g * g;
                    }
                })
            });
    }
}

impl Update {
    /// In the parameter's own precision, as PyTorch's AdamW: `p * (1 - lr * wd) - lr / bc1 *
    /// m / (sqrt(v) / sqrt(bc2) + eps)` with the bias corrections `bc = 1 - beta^step`.
    fn apply<T: Float>(&self, p: &mut [T], mv: &[T]) {
        let h = &self.0;
        let bc1 = 1.0 - h.beta1.powi(h.step);
        let bc2 = 1.0 - h.beta2.powi(h.step);
        let decay = T::from_f64(1.0 - h.lr * h.weight_decay);
        let step_size = T::from_f64(h.lr / bc1);
        let (inv_root_bc2, eps) = (T::from_f64(1.0 / bc2.sqrt()), T::from_f64(h.eps));
        let (m, v) = mv.split_at(p.len());
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                wide!({
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        *p = *p * decay - step_size * m / (v.sqrt() * inv_root_bc2 + eps);
                    }
                })
            });
    }
}

/// Implements `InplaceOp2` for `$op`, whose `apply` updates an f32 or f64 slice in place from
/// another of the same dtype.
macro_rules! in_place_op {
    ($op:ty, $name:literal) => {
        impl InplaceOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                dst: &mut CpuStorage,
                dst_l: &Layout,
                src: &CpuStorage,
                src_l: &Layout,
            ) -> candle_core::Result<()> {
                match (dst, src) {
                    (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                        self.apply(slice_mut(d, dst_l, $name)?, contiguous(s, src_l, $name)?)
                    }
                    (CpuStorage::F64(d), CpuStorage::F64(s)) => {
                        self.apply(slice_mut(d, dst_l, $name)?, contiguous(s, src_l, $name)?)
                    }
                    _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype", $name),
                }
                Ok(())
            }
        }
    };
}

in_place_op!(Moments, "adamw-moments");
in_place_op!(Update, "adamw-update");

/// The packed AdamW moments `[m; v]` for `p`: zeros of shape `[2, p.elem_count()]`.
pub fn adamw_moments(p: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros((2, p.elem_count()), p.dtype(), p.device())?)
}

/// One AdamW step on `p` (a variable's tensor, updated in place) with gradient `g`, updating
/// the packed moments ([`adamw_moments`]) in place too: two passes over memory and no new
/// tensors, where the composed form makes about fourteen. PyTorch's `AdamW` arithmetic.
pub fn adamw_step(p: &Tensor, moments: &Tensor, g: &Tensor, h: &AdamW) -> Result<()> {
    let n = p.elem_count();
    if g.elem_count() != n || moments.elem_count() != 2 * n {
        return Err(Error::Invalid(format!(
            "adamw_step: parameter {:?}, gradient {:?} and moments {:?} do not fit",
            p.dims(),
            g.dims(),
            moments.dims()
        )));
    }
    let g = g.contiguous()?;
    moments.inplace_op2(&g, &Moments(*h))?;
    p.inplace_op2(moments, &Update(*h))?;
    Ok(())
}

/// The float types the loop kernels run on.
trait Real:
    'static
    + Copy
    + Default
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
{
    /// The multiplicative identity.
    const ONE: Self;
    /// `self * a + b` rounded once (one instruction on CPUs with FMA, a library call on others).
    fn fma(self, a: Self, b: Self) -> Self;
}
impl Real for f32 {
    const ONE: Self = 1.0;
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
}
impl Real for f64 {
    const ONE: Self = 1.0;
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
}

/// The floats the transcendental kernels (LSTM cell, softmax) run in.
trait Float:
    Real
    + PartialOrd
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::MulAssign
    + std::ops::SubAssign
    + candle_core::WithDType
{
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
}

impl Float for f32 {
    /// `e^x` to about 2 ulp (Cephes' `expf` polynomial) without a libm call, so that loops of
    /// it vectorise: libm's `expf` and `tanhf` took a quarter of a BiLSTM step.
    #[inline(always)]
    fn exp(self) -> Self {
        const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
        let x = self.clamp(-87.0, 88.0);
        let t = x * std::f32::consts::LOG2_E + SHIFT;
        let n = t - SHIFT;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 0.166_666_65;
        let p = p * r + 0.5;
        let p = p * r * r + r + 1.0;
        let scale = f32::from_bits(
            (t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32)
                .wrapping_add(127)
                .wrapping_shl(23) as u32,
        );
        p * scale
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        1.0 - 2.0 / (Float::exp(2.0 * self) + 1.0)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    /// The error function to 1.5e-7 (Abramowitz & Stegun 7.1.26, on [`Float::exp`]), where
    /// libm's `erff` is a call per element: a tenth of a transformer step's GELU.
    #[inline(always)]
    fn erf(self) -> Self {
        let a = self.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let p = 1.061_405_4_f32;
        let p = p * t - 1.453_152_1;
        let p = p * t + 1.421_413_8;
        let p = p * t - 0.284_496_74;
        let p = p * t + 0.254_829_6;
        (1.0 - p * t * Float::exp(-a * a)).copysign(self)
    }
}

impl Float for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// `sum(f(v))` over `values` in eight interleaved partial sums: one running sum does not
/// vectorise (float addition is not reassociated).
#[inline(always)]
fn lane_sum<T: Real>(values: &[T], f: impl Fn(T) -> T) -> T {
    let mut lanes = [T::default(); 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::default(), |a, &v| a + f(v));
    for c in chunks {
        for l in 0..8 {
            lanes[l] += f(c[l]);
        }
    }
    lanes.iter().fold(tail, |a, &l| a + l)
}

/// The largest of `values` (none NaN; at least one), in eight lanes as [`lane_sum`].
#[inline(always)]
fn lane_max<T: Float>(values: &[T]) -> T {
    let larger = |a: T, b: T| if b > a { b } else { a };
    let mut lanes = [values[0]; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(values[0], |a, &v| larger(a, v));
    for c in chunks {
        for l in 0..8 {
            lanes[l] = larger(lanes[l], c[l]);
        }
    }
    lanes.iter().fold(tail, |a, &l| larger(a, l))
}

/// A depthwise `k x k` convolution (one filter per channel, no bias) of `[b, c, h, w]`.
#[derive(Clone, Copy)]
struct Depthwise {
    padding: usize,
    stride: usize,
}

/// The sizes a depthwise convolution works on.
#[derive(Clone, Copy)]
struct DepthwiseDims {
    planes: usize,
    channels: usize,
    h: usize,
    w: usize,
    k: usize,
    oh: usize,
    ow: usize,
}

impl Depthwise {
    fn dims(&self, x: &Shape, weight: &Shape) -> candle_core::Result<DepthwiseDims> {
        let (b, c, h, w) = x.dims4()?;
        let (wc, one, k, k2) = weight.dims4()?;
        if wc != c || one != 1 || k != k2 || h + 2 * self.padding < k || w + 2 * self.padding < k {
            candle_core::bail!("depthwise: weight {weight:?} does not fit input {x:?}");
        }
        Ok(DepthwiseDims {
            planes: b * c,
            channels: c,
            h,
            w,
            k,
            oh: (h + 2 * self.padding - k) / self.stride + 1,
            ow: (w + 2 * self.padding - k) / self.stride + 1,
        })
    }

    /// The outputs along one axis (`0..outputs`) whose input `o * stride + tap - padding` lies
    /// in `0..inputs`.
    fn valid(&self, outputs: usize, inputs: usize, tap: usize) -> std::ops::Range<usize> {
        let (p, s) = (self.padding, self.stride);
        let lo = p.saturating_sub(tap).div_ceil(s);
        let hi = if inputs + p > tap {
            ((inputs - 1 + p - tap) / s + 1).min(outputs)
        } else {
            0
        };
        lo..hi.max(lo)
    }

    /// Calls `f(output row, input row, weight row)` for every output row of one plane and every
    /// kernel row `i` that reads an input row, and within it `g(tap j, output columns, the
    /// first input column)` through the returned column ranges: the caller's loops run over
    /// whole rows, with no test per element.
    #[inline(always)]
    fn each_row(
        &self,
        d: &DepthwiseDims,
        mut f: impl FnMut(usize, usize, usize, &[(usize, std::ops::Range<usize>)]),
    ) {
        let columns: Vec<(usize, std::ops::Range<usize>)> =
            (0..d.k).map(|j| (j, self.valid(d.ow, d.w, j))).collect();
        for i in 0..d.k {
            for oy in self.valid(d.oh, d.h, i) {
                let y = oy * self.stride + i - self.padding;
                f(oy, y, i, &columns);
            }
        }
    }

    fn forward<T: Real>(&self, x: &[T], weight: &[T], d: &DepthwiseDims) -> Vec<T> {
        let (s, p, k) = (self.stride, self.padding, d.k);
        let mut out = vec![T::default(); d.planes * d.oh * d.ow];
        out.par_chunks_mut(d.oh * d.ow)
            .zip(x.par_chunks(d.h * d.w))
            .enumerate()
            .for_each(|(plane, (out, x))| {
                let wk = &weight[(plane % d.channels) * k * k..][..k * k];
                wide!({
                    self.each_row(d, |oy, y, i, columns| {
                        let (o_row, x_row) = (&mut out[oy * d.ow..][..d.ow], &x[y * d.w..][..d.w]);
                        for (j, r) in columns {
                            let wv = wk[i * k + j];
                            if s == 1 {
                                let src = &x_row[r.start + j - p..r.end + j - p];
                                o_row[r.clone()]
                                    .iter_mut()
                                    .zip(src)
                                    .for_each(|(o, &v)| *o += wv * v);
                            } else {
                                for ox in r.clone() {
                                    o_row[ox] += wv * x_row[ox * s + j - p];
                                }
                            }
                        }
                    })
                });
            });
        out
    }

    /// `dx` then `dweight`, packed.
    fn backward<T: Real>(&self, x: &[T], weight: &[T], dy: &[T], d: &DepthwiseDims) -> Vec<T> {
        let (s, p, k) = (self.stride, self.padding, d.k);
        let mut out = vec![T::default(); x.len() + weight.len()];
        let (dx, dw) = out.split_at_mut(x.len());
        // Each plane writes its own part of dx; one task per image sums the weight gradient of
        // its planes, and the partial sums are added in image order: the same result however
        // the pool schedules them.
        let start = || vec![T::default(); weight.len()];
        let (plane_in, plane_out) = (d.h * d.w, d.oh * d.ow);
        let per_image = (plane_in * d.channels, plane_out * d.channels);
        let partials: Vec<Vec<T>> = dx
            .par_chunks_mut(per_image.0)
            .zip(x.par_chunks(per_image.0).zip(dy.par_chunks(per_image.1)))
            .map(|(dx, (x, dy))| {
                let mut acc = start();
                let planes = dx
                    .chunks_mut(plane_in)
                    .zip(x.chunks(plane_in).zip(dy.chunks(plane_out)));
                for (c, (dx, (x, dy))) in planes.enumerate() {
                    let wk = &weight[c * k * k..][..k * k];
                    let dwk = &mut acc[c * k * k..][..k * k];
                    wide!({
                        self.each_row(d, |oy, y, i, columns| {
                            let dy_row = &dy[oy * d.ow..][..d.ow];
                            let (dx_row, x_row) = (&mut dx[y * d.w..][..d.w], &x[y * d.w..][..d.w]);
                            for (j, r) in columns {
                                let (wv, mut sum) = (wk[i * k + j], T::default());
                                if s == 1 {
                                    let at = r.start + j - p..r.end + j - p;
                                    for ((dxv, &xv), &g) in dx_row[at.clone()]
                                        .iter_mut()
                                        .zip(&x_row[at])
                                        .zip(&dy_row[r.clone()])
                                    {
                                        *dxv += g * wv;
                                        sum += g * xv;
                                    }
                                } else {
                                    for ox in r.clone() {
                                        let g = dy_row[ox];
                                        dx_row[ox * s + j - p] += g * wv;
                                        sum += g * x_row[ox * s + j - p];
                                    }
                                }
                                dwk[i * k + j] += sum;
                            }
                        })
                    });
                }
                acc
            })
            .collect();
        let sums = partials.into_iter().fold(start(), add_vectors);
        dw.copy_from_slice(&sums);
        out
    }
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.shape(), l2.shape())?;
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |x, w| self
            .forward(x, w, &d,));
        let b = d.planes / d.channels;
        Ok((out, Shape::from((b, d.channels, d.oh, d.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &DepthwiseGrad(*self))?;
        let n = x.elem_count();
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(
                packed
                    .narrow(0, n, weight.elem_count())?
                    .reshape(weight.shape())?,
            ),
        ))
    }
}

/// The backward pass of [`Depthwise`] on `(x, weight, dy)`: `dx` and `dweight`, packed.
struct DepthwiseGrad(Depthwise);

impl CustomOp3 for DepthwiseGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv-backward"
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
        let d = self.0.dims(l1.shape(), l2.shape())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => {
                CpuStorage::F32(self.0.backward(
                    contiguous(x, l1, self.name())?,
                    contiguous(w, l2, self.name())?,
                    contiguous(dy, l3, self.name())?,
                    &d,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => {
                CpuStorage::F64(self.0.backward(
                    contiguous(x, l1, self.name())?,
                    contiguous(w, l2, self.name())?,
                    contiguous(dy, l3, self.name())?,
                    &d,
                ))
            }
            _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype", self.name()),
        };
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// A depthwise convolution (weight `[c, 1, k, k]`, one filter per channel, zero padding,
/// stride) of `x` (`[b, c, h, w]`) as one loop kernel forward and one backward, where the
/// composed form (shifted copies, scaled and summed) writes a full-size tensor per tap.
pub fn depthwise_conv(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if stride == 0 {
        return Err(Error::Invalid("depthwise_conv: stride 0".into()));
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, Depthwise { padding, stride })?)
}

mod attention;
mod batch_norm;
mod conv;
mod direct;
mod gelu;
mod kl;
mod layer_norm;
mod linear;
mod lstm;
mod matmul;
mod pairwise;
mod pool;
mod softmax;
pub use attention::attention;
pub use batch_norm::{BatchStats, batch_norm};
pub use conv::conv2d;
pub use gelu::gelu_erf;
pub use kl::{cross_entropy, kl_batchmean};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use lstm::bilstm_final_states;
pub use matmul::{CblasSgemm, cblas_sgemm_installed, matmul_flops, use_cblas_sgemm};
pub use pairwise::{pairwise_add, pairwise_mul};
pub use pool::max_pool2d;
pub use softmax::softmax_last;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{central_differences, max_abs_difference, max_relative_error};
    use candle_core::{Device, Var};

    pub(super) fn seq(shape: &[usize], scale: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 101) as f64 / 50.0 - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    pub(super) type Loss<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

    /// `ours` and `theirs` (two computations from the same `inputs`, f64) give the same values,
    /// and the same gradients of a weighted sum of squares w.r.t. every input.
    pub(super) fn assert_same(
        ours: Loss<'_>,
        theirs: Loss<'_>,
        inputs: &[Tensor],
        what: &str,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (ours(&tensors)?, theirs(&tensors)?);
        assert_eq!(a.dims(), b.dims(), "{what}");
        assert!(max_abs_difference(&a, &b)? < 1e-12, "{what}: values differ");
        let w = seq(a.dims(), 0.7)?;
        let ga = (&a * &w)?.sqr()?.sum_all()?.backward()?;
        let gb = (&b * &w)?.sqr()?.sum_all()?.backward()?;
        for (i, var) in vars.iter().enumerate() {
            match (ga.get(var.as_tensor()), gb.get(var.as_tensor())) {
                (Some(x), Some(y)) => {
                    let err = max_relative_error(x, y, 1e-9)?;
                    assert!(err < 1e-9, "{what}: input {i}: relative error {err}");
                }
                _ => panic!("{what}: input {i} has no gradient"),
            }
        }
        Ok(())
    }

    /// The gradients of the scalar `loss` w.r.t. every input against central differences.
    pub(super) fn assert_finite_differences(
        loss: Loss<'_>,
        inputs: &[Tensor],
        what: &str,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss(&tensors)?.backward()?;
        for (i, var) in vars.iter().enumerate() {
            let at = |v: &Tensor| -> Result<f64> {
                let mut probe = inputs.to_vec();
                probe[i] = v.clone();
                Ok(loss(&probe)?.to_scalar::<f64>()?)
            };
            let numeric = central_differences(at, &inputs[i], 1e-6)?;
            let analytic = grads
                .get(var.as_tensor())
                .ok_or_else(|| Error::Invalid(format!("{what}: input {i} has no gradient")))?;
            let err = max_relative_error(analytic, &numeric, 1e-6)?;
            assert!(err < 1e-5, "{what}: input {i}: relative error {err}");
        }
        Ok(())
    }

    #[test]
    fn channel_ops_equal_the_broadcast_ops_and_finite_differences() -> Result<()> {
        for (shape, dim) in [
            (vec![4, 3, 5, 2], 1),
            (vec![6, 7], 1),
            (vec![5, 4], 0),
            (vec![2, 3, 4], 2),
        ] {
            let mut view = vec![1; shape.len()];
            view[dim] = shape[dim];
            let inputs = [seq(&shape, 1.0)?, seq(&[shape[dim]], 0.7)?];
            for combine in [Combine::Add, Combine::Mul] {
                let ours = |t: &[Tensor]| channel_op(&t[0], &t[1], dim, combine);
                let theirs = |t: &[Tensor]| -> Result<Tensor> {
                    let v = t[1].reshape(view.as_slice())?;
                    Ok(match combine {
                        Combine::Add => t[0].broadcast_add(&v)?,
                        Combine::Mul => t[0].broadcast_mul(&v)?,
                    })
                };
                assert_same(&ours, &theirs, &inputs, &format!("{combine:?} {shape:?}"))?;
            }
        }
        let w = seq(&[3, 4, 2, 2], 0.3)?;
        let inputs = [seq(&[3, 4, 2, 2], 1.0)?, seq(&[4], 0.5)?];
        for combine in [Combine::Add, Combine::Mul] {
            let loss = |t: &[Tensor]| -> Result<Tensor> {
                Ok((channel_op(&t[0], &t[1], 1, combine)?.sqr()? * &w)?.sum_all()?)
            };
            assert_finite_differences(&loss, &inputs, &format!("{combine:?}"))?;
        }
        Ok(())
    }

    /// The composed form: statistics per sample and group, then the per-channel affine map.
    fn composed_group_norm(t: &[Tensor], groups: usize) -> Result<Tensor> {
        let (x, gamma, beta) = (&t[0], &t[1], &t[2]);
        let dims = x.dims().to_vec();
        let grouped = x.reshape((dims[0], groups, ()))?;
        let mean = grouped.mean_keepdim(2)?;
        let centred = grouped.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .reshape(dims.as_slice())?;
        let mut view = vec![1; dims.len()];
        view[1] = dims[1];
        Ok(normed
            .broadcast_mul(&gamma.reshape(view.as_slice())?)?
            .broadcast_add(&beta.reshape(view.as_slice())?)?)
    }

    #[test]
    fn group_norm_equals_the_composed_form_and_finite_differences() -> Result<()> {
        for (shape, groups) in [(vec![3, 4, 2, 3], 2), (vec![2, 6, 5], 3), (vec![5, 7], 1)] {
            let c = shape[1];
            let inputs = [seq(&shape, 2.0)?, (seq(&[c], 0.5)? + 1.0)?, seq(&[c], 0.3)?];
            let ours = |t: &[Tensor]| group_norm(&t[0], &t[1], &t[2], groups, 1e-5);
            let theirs = |t: &[Tensor]| composed_group_norm(t, groups);
            assert_same(&ours, &theirs, &inputs, &format!("{shape:?}"))?;
        }
        let w = seq(&[2, 4, 3], 0.7)?;
        let inputs = [
            seq(&[2, 4, 3], 2.0)?,
            (seq(&[4], 0.5)? + 1.0)?,
            seq(&[4], 0.3)?,
        ];
        let loss = |t: &[Tensor]| -> Result<Tensor> {
            Ok((group_norm(&t[0], &t[1], &t[2], 2, 1e-5)? * &w)?
                .sqr()?
                .sum_all()?)
        };
        assert_finite_differences(&loss, &inputs, "group norm")
    }

    /// The fused group norm + ReLU and the standalone ReLU equal candle's `relu` after the
    /// composed form (no input lies exactly at a kink), values and gradients.
    #[test]
    fn relu_and_group_norm_relu_equal_the_composed_form() -> Result<()> {
        for (shape, groups) in [(vec![3, 4, 2, 3], 2), (vec![2, 6, 5], 3), (vec![5, 7], 1)] {
            let c = shape[1];
            let inputs = [seq(&shape, 2.0)?, (seq(&[c], 0.5)? + 1.0)?, seq(&[c], 0.3)?];
            let ours = |t: &[Tensor]| group_norm_relu(&t[0], &t[1], &t[2], groups, 1e-5);
            let theirs = |t: &[Tensor]| Ok(composed_group_norm(t, groups)?.relu()?);
            assert_same(&ours, &theirs, &inputs, &format!("{shape:?}"))?;
            let ours = |t: &[Tensor]| relu(&t[0]);
            let theirs = |t: &[Tensor]| Ok(t[0].relu()?);
            // Shifted off the grid of `seq` values so that no input is exactly 0.
            let x = [(seq(&shape, 2.0)? + 0.013)?];
            assert_same(&ours, &theirs, &x, &format!("relu {shape:?}"))?;
        }
        Ok(())
    }

    /// In f32 (sums in the data's precision, as PyTorch's) the fused group norm and its
    /// gradients stay within f32 rounding of the f64 ones, at a MobileNet layer's size.
    #[test]
    fn group_norm_relu_in_f32_matches_f64() -> Result<()> {
        let shape = [4, 16, 14, 14];
        let inputs = [
            seq(&shape, 3.0)?,
            (seq(&[16], 0.5)? + 1.0)?,
            seq(&[16], 0.3)?,
        ];
        let w = seq(&shape, 0.7)?;
        let grads = |dtype: DType| -> Result<Vec<Tensor>> {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
                .collect::<candle_core::Result<_>>()?;
            let y = group_norm_relu(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                4,
                1e-5,
            )?;
            let g = (&y * &w.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let mut out = vec![y.to_dtype(DType::F64)?];
            for v in &vars {
                let gv = g
                    .get(v.as_tensor())
                    .ok_or_else(|| Error::Invalid("no gradient".into()))?;
                out.push(gv.to_dtype(DType::F64)?);
            }
            Ok(out)
        };
        for (i, (a, b)) in grads(DType::F32)?
            .iter()
            .zip(&grads(DType::F64)?)
            .enumerate()
        {
            let err = max_relative_error(a, b, 1e-3)?;
            assert!(err < 1e-4, "output {i}: relative error {err}");
        }
        Ok(())
    }

    /// The composed LSTM direction the kernel replaces (per-step slices and tensor ops).
    fn composed_lstm(t: &[Tensor], mask: &Tensor, backwards: bool) -> Result<Tensor> {
        let (gates_in, w_hh) = (&t[0], &t[1]);
        let (steps, b, four_h) = gates_in.dims3()?;
        let h = four_h / 4;
        let sig = |x: Tensor| -> Result<Tensor> { Ok((x.neg()?.exp()? + 1.0)?.recip()?) };
        let mut state = Tensor::zeros((b, h), gates_in.dtype(), gates_in.device())?;
        let mut cell = state.clone();
        let mut all = Vec::new();
        for k in 0..steps {
            let s = if backwards { steps - 1 - k } else { k };
            let g = (gates_in.get(s)? + state.matmul(&w_hh.t()?)?)?;
            let i = sig(g.narrow(1, 0, h)?)?;
            let f = sig(g.narrow(1, h, h)?)?;
            let c = g.narrow(1, 2 * h, h)?.tanh()?;
            let o = sig(g.narrow(1, 3 * h, h)?)?;
            let new_cell = ((f * &cell)? + (i * c)?)?;
            let new_state = (o * new_cell.tanh()?)?;
            let m = mask.narrow(1, s, 1)?;
            cell = (&cell + (new_cell - &cell)?.broadcast_mul(&m)?)?;
            state = (&state + (new_state - &state)?.broadcast_mul(&m)?)?;
            all.push(Tensor::cat(&[&state, &cell], 1)?);
        }
        Ok(Tensor::stack(&all, 0)?)
    }

    #[test]
    fn bilstm_final_states_equal_the_composed_recurrences_and_finite_differences() -> Result<()> {
        let (t, b, h) = (4, 3, 2);
        let mask = Tensor::new(
            &[
                [1.0f64, 1.0, 1.0, 1.0],
                [1.0, 1.0, 0.0, 0.0],
                [1.0, 0.0, 0.0, 0.0],
            ],
            &Device::Cpu,
        )?;
        // Each direction's own gates and recurrent weight.
        let inputs = [
            seq(&[t, b, 4 * h], 1.5)?,
            seq(&[t, b, 4 * h], 1.2)?,
            seq(&[4 * h, h], 0.8)?,
            seq(&[4 * h, h], 0.6)?,
        ];
        let ours = |x: &[Tensor]| bilstm_final_states([&x[0], &x[1]], [&x[2], &x[3]], &mask);
        // The composed recurrences' last states taken, their hidden halves side by side.
        let theirs = |x: &[Tensor]| -> Result<Tensor> {
            let last = |backwards: bool, g: &Tensor, w: &Tensor| -> Result<Tensor> {
                let states = composed_lstm(&[g.clone(), w.clone()], &mask, backwards)?;
                Ok(states.get(t - 1)?.narrow(1, 0, h)?)
            };
            Ok(Tensor::cat(
                &[last(false, &x[0], &x[2])?, last(true, &x[1], &x[3])?],
                1,
            )?)
        };
        assert_same(&ours, &theirs, &inputs, "bilstm")?;
        let mask = Tensor::new(&[[1.0f64, 1.0, 1.0], [1.0, 1.0, 0.0]], &Device::Cpu)?;
        let w = seq(&[2, 4], 0.7)?;
        let loss = |x: &[Tensor]| -> Result<Tensor> {
            Ok(
                (bilstm_final_states([&x[0], &x[1]], [&x[2], &x[3]], &mask)? * &w)?
                    .sqr()?
                    .sum_all()?,
            )
        };
        let inputs = [
            seq(&[3, 2, 8], 1.5)?,
            seq(&[3, 2, 8], 1.1)?,
            seq(&[8, 2], 0.8)?,
            seq(&[8, 2], 0.5)?,
        ];
        assert_finite_differences(&loss, &inputs, "bilstm")
    }

    /// Values against candle's grouped convolution (one group per channel), gradients against
    /// finite differences (candle's grouped backward fails on some strided shapes).
    #[test]
    fn depthwise_conv_equals_grouped_convolution_and_finite_differences() -> Result<()> {
        for (padding, stride) in [(1, 1), (1, 2), (0, 1), (2, 3)] {
            let (x, w) = (seq(&[2, 3, 7, 6], 1.0)?, seq(&[3, 1, 3, 3], 0.5)?);
            let ours = depthwise_conv(&x, &w, padding, stride)?;
            let theirs = x.conv2d(&w, padding, stride, 1, 3)?;
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_abs_difference(&ours, &theirs)? < 1e-12);
            let inputs = [seq(&[1, 2, 5, 4], 1.0)?, seq(&[2, 1, 3, 3], 0.5)?];
            let weights = seq(
                depthwise_conv(&inputs[0], &inputs[1], padding, stride)?.dims(),
                0.7,
            )?;
            let loss = |t: &[Tensor]| -> Result<Tensor> {
                Ok((depthwise_conv(&t[0], &t[1], padding, stride)? * &weights)?
                    .sqr()?
                    .sum_all()?)
            };
            assert_finite_differences(
                &loss,
                &inputs,
                &format!("padding {padding} stride {stride}"),
            )?;
        }
        Ok(())
    }

    /// The fused convolution equals candle's `conv2d` plus a bias, values and gradients, at
    /// every kernel size, padding and stride the models use (1x1 included) and on batches
    /// smaller than the thread pool.
    #[test]
    fn conv2d_equals_candle_conv2d_plus_bias() -> Result<()> {
        for (b, k, padding, stride) in [
            (2, 3, 1, 1),
            (3, 3, 1, 2),
            (2, 1, 0, 1),
            (2, 1, 0, 2),
            (1, 5, 2, 1),
            (5, 3, 0, 3),
            (2, 5, 0, 1),
        ] {
            let inputs = [
                seq(&[b, 3, 7, 7], 1.0)?,
                seq(&[4, 3, k, k], 0.5)?,
                seq(&[4], 0.3)?,
            ];
            let ours = |t: &[Tensor]| conv2d(&t[0], &t[1], &t[2], padding, stride);
            let theirs = |t: &[Tensor]| {
                let y = t[0].conv2d(&t[1], padding, stride, 1, 1)?;
                Ok(y.broadcast_add(&t[2].reshape((1, 4, 1, 1))?)?)
            };
            let what = format!("batch {b} k {k} padding {padding} stride {stride}");
            assert_same(&ours, &theirs, &inputs, &what)?;
        }
        Ok(())
    }

    /// The direct 3x3 kernel (16 to 64 channels in and out, on CPUs with AVX-512; the im2col
    /// path elsewhere) equals candle's `conv2d` plus a bias, values and gradients, in f64 and
    /// in f32: every padding it takes, channel counts that fill no whole block of 8 or 16,
    /// rectangular images and batches smaller than the pool.
    #[test]
    fn conv2d_on_many_channels_equals_candle() -> Result<()> {
        for (b, c, out, (h, w), padding) in [
            (2, 16, 16, (6, 6), 1),
            (3, 17, 19, (5, 9), 1),
            (1, 24, 33, (7, 4), 0),
            (2, 16, 20, (3, 5), 2),
        ] {
            let inputs = [
                seq(&[b, c, h, w], 1.0)?,
                seq(&[out, c, 3, 3], 0.5)?,
                seq(&[out], 0.3)?,
            ];
            let ours = |t: &[Tensor]| conv2d(&t[0], &t[1], &t[2], padding, 1);
            let theirs = |t: &[Tensor]| {
                let y = t[0].conv2d(&t[1], padding, 1, 1, 1)?;
                Ok(y.broadcast_add(&t[2].reshape((1, out, 1, 1))?)?)
            };
            let what = format!("{c} -> {out} channels, {h}x{w}, padding {padding}");
            assert_same(&ours, &theirs, &inputs, &what)?;
            let f32s = inputs
                .iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let x = Var::from_tensor(&f32s[0])?;
            let (a, b) = (
                ours(&[x.as_tensor().clone(), f32s[1].clone(), f32s[2].clone()])?,
                theirs(&f32s)?,
            );
            assert!(
                max_relative_error(&a, &b, 1.0)? < 1e-5,
                "{what}: f32 values"
            );
            let probe = seq(a.dims(), 0.9)?.to_dtype(DType::F32)?;
            let ga = (&a * &probe)?.sum_all()?.backward()?;
            let dx = ga
                .get(x.as_tensor())
                .ok_or_else(|| Error::Invalid("no dx".into()))?;
            let xt = Var::from_tensor(&f32s[0])?;
            let bt = theirs(&[xt.as_tensor().clone(), f32s[1].clone(), f32s[2].clone()])?;
            let gb = (&bt * &probe)?.sum_all()?.backward()?;
            let dxt = gb
                .get(xt.as_tensor())
                .ok_or_else(|| Error::Invalid("no dx".into()))?;
            assert!(
                max_relative_error(dx, dxt, 1.0)? < 1e-5,
                "{what}: f32 input gradient"
            );
        }
        Ok(())
    }

    /// The kernels that add partial sums (a convolution's weight gradient over the batch, the
    /// KL divergence over rows) give the same bits on pools of 1, 2, 3 and 8 threads: a job
    /// computes the same numbers whichever executor runs it with however many threads.
    #[test]
    fn parallel_sums_do_not_depend_on_the_pool_size() -> Result<()> {
        let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| Error::Invalid(e.to_string()))?;
            pool.install(|| {
                let f32s = |t: Tensor| t.to_dtype(candle_core::DType::F32);
                let x = Var::from_tensor(&f32s(seq(&[37, 3, 9, 9], 1.0)?)?)?;
                let w = Var::from_tensor(&f32s(seq(&[8, 3, 3, 3], 0.5)?)?)?;
                let b = Var::from_tensor(&f32s(seq(&[8], 0.3)?)?)?;
                let y = conv2d(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1, 1)?;
                let grads = y.sqr()?.sum_all()?.backward()?;
                let s = f32s(seq(&[300, 97], 3.0)?)?;
                let t = f32s(seq(&[300, 97], 2.0)?.sqr()?)?;
                let kl = kl_batchmean(&s, &t, 4.0)?;
                let mut out = vec![kl.flatten_all()?.to_vec1::<f32>()?];
                for v in [&x, &w, &b] {
                    let g = grads
                        .get(v.as_tensor())
                        .ok_or_else(|| Error::Invalid("no gradient".into()))?;
                    out.push(g.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(out)
            })
        };
        let one = run(1)?;
        for threads in [2, 3, 8] {
            assert!(run(threads)? == one, "{threads} threads differ from 1");
        }
        Ok(())
    }

    /// Rectangular kernels (a 1 x k convolution over time, as TextCNN's) equal candle's too.
    #[test]
    fn conv2d_with_a_rectangular_kernel_equals_candle() -> Result<()> {
        for (kh, kw, padding) in [(1, 3, 0), (1, 5, 0), (2, 3, 1)] {
            let inputs = [
                seq(&[2, 3, 4, 9], 1.0)?,
                seq(&[4, 3, kh, kw], 0.5)?,
                seq(&[4], 0.3)?,
            ];
            let ours = |t: &[Tensor]| conv2d(&t[0], &t[1], &t[2], padding, 1);
            let theirs = |t: &[Tensor]| {
                let y = t[0].conv2d(&t[1], padding, 1, 1, 1)?;
                Ok(y.broadcast_add(&t[2].reshape((1, 4, 1, 1))?)?)
            };
            assert_same(
                &ours,
                &theirs,
                &inputs,
                &format!("{kh}x{kw} padding {padding}"),
            )?;
        }
        // One channel, the kernel as wide as the input (TextCNN's windows): one product over
        // the batch; the last case has a single window per image.
        for (b, h, w, kh) in [(2, 7, 5, 3), (3, 6, 4, 6), (1, 9, 8, 1)] {
            let inputs = [
                seq(&[b, 1, h, w], 1.0)?,
                seq(&[4, 1, kh, w], 0.5)?,
                seq(&[4], 0.3)?,
            ];
            let ours = |t: &[Tensor]| conv2d(&t[0], &t[1], &t[2], 0, 1);
            let theirs = |t: &[Tensor]| {
                let y = t[0].conv2d(&t[1], 0, 1, 1, 1)?;
                Ok(y.broadcast_add(&t[2].reshape((1, 4, 1, 1))?)?)
            };
            assert_same(&ours, &theirs, &inputs, &format!("windows {kh}x{w} of {h}"))?;
        }
        Ok(())
    }

    /// The input gradient is computed only when the input needs one, and the weight gradient
    /// is the same either way; in f32 the op matches candle to float precision.
    #[test]
    fn conv2d_skips_the_gradient_of_a_constant_input() -> Result<()> {
        let x = seq(&[3, 2, 6, 6], 1.0)?.to_dtype(DType::F32)?;
        let w = Var::from_tensor(&seq(&[5, 2, 3, 3], 0.5)?.to_dtype(DType::F32)?)?;
        let bias = Var::from_tensor(&seq(&[5], 0.2)?.to_dtype(DType::F32)?)?;
        let ours = conv2d(&x, w.as_tensor(), bias.as_tensor(), 1, 1)?;
        let theirs = x
            .conv2d(w.as_tensor(), 1, 1, 1, 1)?
            .broadcast_add(&bias.as_tensor().reshape((1, 5, 1, 1))?)?;
        assert!(max_relative_error(&ours, &theirs, 1.0)? < 1e-5);
        let probe = seq(ours.dims(), 0.9)?.to_dtype(DType::F32)?;
        let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
        let g_theirs = (&theirs * &probe)?.sum_all()?.backward()?;
        assert!(g_ours.get(&x).is_none(), "a constant input got a gradient");
        for v in [&w, &bias] {
            let (a, b) = (g_ours.get(v.as_tensor()), g_theirs.get(v.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("a parameter has no gradient")
            };
            assert!(max_relative_error(a, b, 1.0)? < 1e-5);
        }
        assert!(conv2d(&x, &x, bias.as_tensor(), 1, 1).is_err());
        Ok(())
    }

    /// The fused layer equals `x W^T + b` composed from candle ops, values and gradients, also
    /// with widths that split into bands over threads (`matmul` divides output columns) and
    /// with one output or one input (`matmul`'s row loops, parallel from 1,024 rows).
    #[test]
    fn linear_equals_the_composed_product_plus_bias() -> Result<()> {
        for (rows, input, output) in [
            (3, 4, 5),
            (1, 7, 2),
            (6, 3, 300),
            (5, 9, 257),
            (4, 5, 1),
            (3, 1, 6),
            (1100, 3, 1),
            (1030, 1, 4),
        ] {
            let inputs = [
                seq(&[rows, input], 1.0)?,
                seq(&[output, input], 0.5)?,
                seq(&[output], 0.3)?,
            ];
            let ours = |t: &[Tensor]| linear(&t[0], &t[1], &t[2]);
            let theirs = |t: &[Tensor]| Ok(t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2])?);
            let what = format!("{rows}x{input} -> {output}");
            assert_same(&ours, &theirs, &inputs, &what)?;
        }
        let x = seq(&[4, 3], 1.0)?;
        let w = Var::from_tensor(&seq(&[2, 3], 0.5)?)?;
        let b = Var::from_tensor(&seq(&[2], 0.5)?)?;
        let grads = linear(&x, w.as_tensor(), b.as_tensor())?
            .sum_all()?
            .backward()?;
        assert!(grads.get(&x).is_none(), "a constant input got a gradient");
        assert!(grads.get(w.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        assert!(linear(&x, &x, b.as_tensor()).is_err());
        Ok(())
    }

    /// The pairwise sum and product equal candle's broadcast forms, values and gradients.
    #[test]
    fn pairwise_ops_equal_the_broadcast_forms() -> Result<()> {
        for (b, n, d) in [(3, 5, 2), (1, 9, 4), (6, 1, 3)] {
            let inputs = [seq(&[b, d], 1.0)?, seq(&[n, d], 0.7)?];
            let theirs =
                |t: &[Tensor]| Ok(t[0].unsqueeze(1)?.broadcast_add(&t[1].unsqueeze(0)?)?);
            let ours = |t: &[Tensor]| pairwise_add(&t[0], &t[1]);
            assert_same(&ours, &theirs, &inputs, &format!("add {b} {n} {d}"))?;
            let theirs =
                |t: &[Tensor]| Ok(t[0].unsqueeze(1)?.broadcast_mul(&t[1].unsqueeze(0)?)?);
            let ours = |t: &[Tensor]| pairwise_mul(&t[0], &t[1]);
            assert_same(&ours, &theirs, &inputs, &format!("mul {b} {n} {d}"))?;
        }
        assert!(pairwise_add(&seq(&[2, 3], 1.0)?, &seq(&[2, 4], 1.0)?).is_err());
        Ok(())
    }

    /// The one-pass softmax equals the composed stable form, values and gradients, and its
    /// gradients equal finite differences.
    #[test]
    fn softmax_last_equals_the_composed_form_and_finite_differences() -> Result<()> {
        for shape in [vec![3, 5], vec![2, 3, 4], vec![1, 1], vec![7]] {
            let inputs = [seq(&shape, 3.0)?];
            let ours = |t: &[Tensor]| softmax_last(&t[0]);
            let theirs = |t: &[Tensor]| {
                crate::ops::log_softmax(&t[0], candle_core::D::Minus1)?
                    .exp()
                    .map_err(Error::from)
            };
            assert_same(&ours, &theirs, &inputs, &format!("{shape:?}"))?;
        }
        let w = seq(&[2, 4], 0.7)?;
        let loss =
            |t: &[Tensor]| -> Result<Tensor> { Ok((softmax_last(&t[0])? * &w)?.sqr()?.sum_all()?) };
        assert_finite_differences(&loss, &[seq(&[2, 4], 2.0)?], "softmax")
    }

    /// The one-pass max pool equals candle's `max_pool2d` in value, and its gradients equal
    /// finite differences (inputs without ties; odd sizes drop the last row and column as candle
    /// does). candle 0.11's own backward scales the gradient by 1 / k^2 (it multiplies by the
    /// window's mean of the max mask instead of dividing by its count): a trap this op avoids.
    #[test]
    fn max_pool2d_equals_candle_forward_and_finite_differences() -> Result<()> {
        for (shape, k) in [([2, 3, 4, 4], 2), ([1, 2, 7, 5], 2), ([2, 1, 6, 6], 3)] {
            let n: usize = shape.iter().product();
            // Distinct values in a scrambled order: no window has two maxima.
            let v: Vec<f64> = (0..n).map(|i| ((i * 7919) % n) as f64 / n as f64).collect();
            let x = Tensor::from_vec(v, &shape, &Device::Cpu)?;
            let ours = max_pool2d(&x, k)?;
            assert!(max_abs_difference(&ours, &x.max_pool2d(k)?)? < 1e-15);
            let w = seq(ours.dims(), 0.7)?;
            let loss = |t: &[Tensor]| -> Result<Tensor> {
                Ok((max_pool2d(&t[0], k)? * &w)?.sqr()?.sum_all()?)
            };
            assert_finite_differences(&loss, std::slice::from_ref(&x), &format!("{shape:?}"))?;
            if shape[2] % k != 0 || shape[3] % k != 0 {
                continue;
            }
            // candle's gradient is ours / k^2 (where the windows tile the input).
            let var = Var::from_tensor(&x)?;
            let ours = (max_pool2d(var.as_tensor(), k)? * &w)?
                .sum_all()?
                .backward()?;
            let theirs = (var.as_tensor().max_pool2d(k)? * &w)?
                .sum_all()?
                .backward()?;
            let (Some(a), Some(b)) = (ours.get(var.as_tensor()), theirs.get(var.as_tensor()))
            else {
                panic!("no gradient")
            };
            assert!(max_abs_difference(&(a / (k * k) as f64)?, b)? < 1e-12);
        }
        assert!(max_pool2d(&seq(&[2, 3], 1.0)?, 2).is_err());
        Ok(())
    }

    /// The one-op distillation KL equals the composed form (log-softmax of both, batch mean),
    /// values and student gradients, and finite differences; the teacher gets no gradient.
    #[test]
    fn kl_batchmean_equals_the_composed_form_and_finite_differences() -> Result<()> {
        let teacher = (seq(&[4, 5], 1.3)? + 0.4)?;
        for temperature in [1.0, 4.0] {
            let ours = |x: &[Tensor]| kl_batchmean(&x[0], &teacher, temperature);
            let theirs = |x: &[Tensor]| -> Result<Tensor> {
                let log_ps =
                    crate::ops::log_softmax(&(&x[0] / temperature)?, candle_core::D::Minus1)?;
                let log_pt =
                    crate::ops::log_softmax(&(&teacher / temperature)?, candle_core::D::Minus1)?;
                Ok(((log_pt.exp()? * (log_pt - log_ps)?)?.sum_all()? / 4.0)?)
            };
            let inputs = [seq(&[4, 5], 2.0)?];
            assert_same(&ours, &theirs, &inputs, &format!("T {temperature}"))?;
            assert_finite_differences(&ours, &inputs, "kl")?;
        }
        let t = Var::from_tensor(&teacher)?;
        let s = Var::from_tensor(&seq(&[4, 5], 2.0)?)?;
        let grads = kl_batchmean(s.as_tensor(), t.as_tensor(), 2.0)?.backward()?;
        assert!(grads.get(t.as_tensor()).is_none() && grads.get(s.as_tensor()).is_some());
        assert!(kl_batchmean(&seq(&[4, 5], 1.0)?, &seq(&[4, 6], 1.0)?, 2.0).is_err());
        Ok(())
    }

    /// The one-op cross-entropy equals the composed form (log-softmax, gather, mean), values
    /// and gradients, and finite differences; a class id out of range is an error.
    #[test]
    fn cross_entropy_equals_the_composed_form_and_finite_differences() -> Result<()> {
        let ids = Tensor::new(&[2u32, 0, 4, 1], &Device::Cpu)?;
        let ours = |x: &[Tensor]| cross_entropy(&x[0], &ids);
        let theirs = |x: &[Tensor]| -> Result<Tensor> {
            let log_p = crate::ops::log_softmax(&x[0], candle_core::D::Minus1)?;
            let picked = log_p.gather(&ids.unsqueeze(1)?, 1)?.squeeze(1)?;
            Ok(picked.mean_all()?.neg()?)
        };
        let inputs = [seq(&[4, 5], 2.0)?];
        assert_same(&ours, &theirs, &inputs, "cross-entropy")?;
        assert_finite_differences(&ours, &inputs, "cross-entropy")?;
        let bad = Tensor::new(&[2u32, 0, 5, 1], &Device::Cpu)?;
        assert!(cross_entropy(&inputs[0], &bad).is_err());
        Ok(())
    }

    #[test]
    fn a_vector_that_does_not_fit_is_an_error() -> Result<()> {
        let x = seq(&[2, 3], 1.0)?;
        assert!(channel_add(&x, &seq(&[2], 1.0)?, 1).is_err());
        assert!(channel_add(&x, &seq(&[3], 1.0)?, 2).is_err());
        Ok(())
    }

    /// The kernels whose backward passes sum over a batch in parallel give the same bits on
    /// every run: the partial sums are added in a fixed order, whatever the pool's scheduling.
    #[test]
    fn parallel_backward_sums_repeat_bit_for_bit() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let dev = Device::Cpu;
        let rand = |shape: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?)
        };
        let (x, w, b) = (rand(&[16, 8, 32, 32])?, rand(&[8, 8, 3, 3])?, rand(&[8])?);
        let dw = rand(&[8, 1, 3, 3])?;
        let (gamma, beta) = (rand(&[8])?, rand(&[8])?);
        let rows = rand(&[4096, 64])?;
        let (lg, lb) = (rand(&[64])?, rand(&[64])?);
        let probe = Tensor::randn(0f32, 1.0, (16, 8, 32, 32), &dev)?;
        let run = || -> Result<Vec<Vec<f32>>> {
            pool.install(|| {
                let y = conv2d(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1, 1)?;
                let y = group_norm(&y, gamma.as_tensor(), beta.as_tensor(), 4, 1e-5)?;
                let y = depthwise_conv(&y, dw.as_tensor(), 1, 1)?;
                let z = layer_norm(rows.as_tensor(), lg.as_tensor(), lb.as_tensor(), 1e-5)?;
                let loss = ((y * &probe)?.sum_all()? + z.sqr()?.sum_all()?)?;
                let grads = loss.backward()?;
                [&x, &w, &b, &dw, &gamma, &beta, &rows, &lg, &lb]
                    .iter()
                    .map(|v| {
                        let g = grads
                            .get(v.as_tensor())
                            .ok_or_else(|| Error::Invalid("no gradient".into()))?;
                        Ok(g.flatten_all()?.to_vec1::<f32>()?)
                    })
                    .collect()
            })
        };
        let first = run()?;
        // Busy threads beside the pool make its scheduling vary from run to run.
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..3 {
                scope.spawn(|| {
                    let mut spin = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        spin = std::hint::black_box(spin.wrapping_add(1));
                    }
                });
            }
            let mut same = true;
            for _ in 0..10 {
                same &= run()? == first;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(same, "a gradient changed between identical runs");
            Ok(())
        })
    }
}
