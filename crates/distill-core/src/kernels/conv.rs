//! A dense 2-D convolution with bias as one op: per image, its im2col matrix in a scratch buffer
//! and one matrix product (the `gemm` crate, called directly, with the bias as the product's
//! starting value). The backward pass rebuilds each image's im2col matrix instead of keeping it,
//! so a convolution keeps only its input alive (a whole-batch im2col matrix is `k * k` times
//! the input: 58 MB for one 16-channel 3x3 layer at 28x28 and batch 128), and it computes the
//! input gradient only when something upstream needs it (never for the images themselves).
//!
//! A one-channel convolution whose kernel spans the input's whole width (TextCNN's windows over
//! word embeddings) runs as one product over the whole batch instead: each window is a
//! contiguous run of the input, copied as one row of a `[windows, k * width]` matrix (per image,
//! a product of 60 columns ran at a fraction of the speed of one of 4,000 rows).
//!
//! A stride-1 3x3 convolution with 16 to 64 channels runs the direct kernel of
//! [`super::direct`] on CPUs with AVX-512 (no im2col matrix, no product): at those widths
//! copying the im2col matrix and packing it for the product took half of a resnet20 step.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::direct::{Direct, fits_cpu, turned};
use super::matmul::{Threads, count_flops, matmul_into};
use super::{Real, add_vectors, contiguous, same_float};
use crate::{Error, Result};

/// Runs of images the backward pass splits a batch into, whatever the pool's size: enough to
/// keep 16 threads busy, few enough that each run's scratch buffers are allocated once.
const GRAD_TASKS: usize = 16;

/// Channels (in and out) of the convolutions the direct kernel runs. Above, the im2col matrix
/// costs little beside the product it feeds; below, the padded copies and the transposed
/// gradient cost more than the im2col matrix (a 1-channel stem made mobilenet-kd-cached 15%
/// slower).
const DIRECT_CHANNELS: std::ops::RangeInclusive<usize> = 16..=64;

/// A `kh x kw` convolution with zero `padding` and `stride` on `(x, weight, bias)`.
#[derive(Clone, Copy)]
struct Conv2d {
    kh: usize,
    kw: usize,
    padding: usize,
    stride: usize,
}

/// The sizes one [`Conv2d`] works on: input `[b, c, h, w]`, output `[b, out, oh, ow]`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    out: usize,
    oh: usize,
    ow: usize,
}

impl Dims {
    /// Rows of an image's im2col matrix (`c * kh * kw`).
    fn rows(&self, (kh, kw): (usize, usize)) -> usize {
        self.c * kh * kw
    }

    /// Output pixels per channel, the columns of an image's im2col matrix.
    fn plane(&self) -> usize {
        self.oh * self.ow
    }

    /// Input elements per image.
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// How the products of one image run: on one thread when there are enough images for every
    /// thread, else spread over the pool.
    fn threads(&self) -> Threads {
        if self.b >= rayon::current_num_threads() {
            Threads::One
        } else {
            Threads::Pool
        }
    }
}

impl Conv2d {
    fn dims(&self, x: &Shape, weight: &Shape) -> candle_core::Result<Dims> {
        let (b, c, h, w) = x.dims4()?;
        let (out, wc, kh, kw) = weight.dims4()?;
        let p = self.padding;
        if wc != c
            || kh != self.kh
            || kw != self.kw
            || h + 2 * p < kh
            || w + 2 * p < kw
            || self.stride == 0
            || c == 0
            || out == 0
        {
            candle_core::bail!("conv2d: weight {weight:?} does not fit input {x:?}");
        }
        Ok(Dims {
            b,
            c,
            h,
            w,
            out,
            oh: (h + 2 * p - kh) / self.stride + 1,
            ow: (w + 2 * p - kw) / self.stride + 1,
        })
    }

    /// Whether an image's im2col matrix is the image itself (1x1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output columns `ox` whose window column `j` reads an input column (the others read
    /// padding).
    fn inside(&self, d: &Dims, j: usize) -> std::ops::Range<usize> {
        let (p, s) = (self.padding, self.stride);
        let lo = p.saturating_sub(j).div_ceil(s);
        let hi = if d.w + p > j {
            ((d.w - 1 + p - j) / s + 1).min(d.ow)
        } else {
            0
        };
        lo.min(hi)..hi
    }

    /// Calls `f(input row, matrix row segment)` for the output rows of matrix row `(c, i, j)`
    /// whose window row reads the input; `f(None, ..)` for those in the padding.
    fn each_line<'a, T: Real>(
        &self,
        d: &Dims,
        cols: &'a mut [T],
        mut f: impl FnMut(usize, usize, Option<usize>, &'a mut [T]),
    ) {
        let (kh, kw) = (self.kh, self.kw);
        for (row, line) in cols.chunks_mut(d.plane()).enumerate() {
            let (c, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
            for (oy, seg) in line.chunks_mut(d.ow).enumerate() {
                let y = (oy * self.stride + i).checked_sub(self.padding);
                f(c, j, y.filter(|&y| y < d.h), seg);
            }
        }
    }

    /// Writes the im2col matrix (`[c * kh * kw, oh * ow]`) of one image `x` (`[c, h, w]`).
    fn gather<T: Real>(&self, d: &Dims, x: &[T], cols: &mut [T]) {
        let (p, s) = (self.padding, self.stride);
        self.each_line(d, cols, |c, j, y, seg| {
            let Some(y) = y else {
                seg.fill(T::default());
                return;
            };
            let src = &x[(c * d.h + y) * d.w..(c * d.h + y + 1) * d.w];
            let r = self.inside(d, j);
            seg[..r.start].fill(T::default());
            seg[r.end..].fill(T::default());
            if s == 1 {
                let from = r.start + j - p;
                seg[r.clone()].copy_from_slice(&src[from..from + r.len()]);
            } else {
                for ox in r {
                    seg[ox] = src[ox * s + j - p];
                }
            }
        });
    }

    /// Adds an image's im2col-shaped gradient `cols` onto its input gradient `dx` (`[c, h, w]`,
    /// zeroed first): each pixel collects every matrix entry that read it.
    fn scatter<T: Real>(&self, d: &Dims, cols: &mut [T], dx: &mut [T]) {
        dx.fill(T::default());
        let (p, s) = (self.padding, self.stride);
        self.each_line(d, cols, |c, j, y, seg| {
            let Some(y) = y else { return };
            let dst = &mut dx[(c * d.h + y) * d.w..(c * d.h + y + 1) * d.w];
            for ox in self.inside(d, j) {
                dst[ox * s + j - p] += seg[ox];
            }
        });
    }

    /// Whether this is a one-channel convolution whose kernel spans the whole width, unpadded,
    /// with stride 1: every window is a contiguous run of its image.
    fn windows(&self, d: &Dims) -> bool {
        d.c == 1 && self.kw == d.w && self.padding == 0 && self.stride == 1
    }

    /// The matrix `[b * oh, kh * w]` of every window of every image (for [`Self::windows`]).
    fn gather_windows<T: Real>(&self, d: &Dims, x: &[T]) -> Vec<T> {
        let k = self.kh * d.w;
        let mut win = vec![T::default(); d.b * d.oh * k];
        win.par_chunks_mut(d.oh * k)
            .enumerate()
            .for_each(|(n, part)| {
                let x_n = &x[n * d.image()..(n + 1) * d.image()];
                for (t, row) in part.chunks_mut(k).enumerate() {
                    row.copy_from_slice(&x_n[t * d.w..t * d.w + k]);
                }
            });
        win
    }

    /// [`Self::forward`] for [`Self::windows`]: `z [b * oh, out] = windows x weight^T`, then
    /// each image's `z` transposed into `[out, oh]` plus the bias.
    fn forward_windows<T: Real>(&self, d: &Dims, x: &[T], w: &[T], bias: &[T]) -> Vec<T> {
        let (k, m) = (self.kh * d.w, d.b * d.oh);
        let win = self.gather_windows(d, x);
        let mut z = vec![T::default(); m * d.out];
        matmul_into(
            (m, d.out, k),
            &mut z,
            None,
            (&win, k, 1),
            (w, 1, k),
            Threads::Pool,
        );
        let mut y = vec![T::default(); d.b * d.out * d.oh];
        y.par_chunks_mut(d.out * d.oh)
            .enumerate()
            .for_each(|(n, y_n)| {
                for (o, line) in y_n.chunks_mut(d.oh).enumerate() {
                    for (t, v) in line.iter_mut().enumerate() {
                        *v = z[(n * d.oh + t) * d.out + o] + bias[o];
                    }
                }
            });
        y
    }

    /// [`Self::backward`] for [`Self::windows`]: with `gz [b * oh, out]` the output gradient
    /// per window, `dweight = gz^T x windows` (one product over every window), `dbias` the
    /// column sums of `gz` in window order, and `dx` each window's row of `gz x weight` added
    /// back onto the `kh` input rows it covers.
    fn backward_windows<T: Real>(
        &self,
        d: &Dims,
        x: &[T],
        w: &[T],
        g: &[T],
        input_grad: bool,
    ) -> Vec<T> {
        let (k, m) = (self.kh * d.w, d.b * d.oh);
        let mut gz = vec![T::default(); m * d.out];
        gz.par_chunks_mut(d.oh * d.out)
            .enumerate()
            .for_each(|(n, part)| {
                let g_n = &g[n * d.out * d.oh..(n + 1) * d.out * d.oh];
                for (t, row) in part.chunks_mut(d.out).enumerate() {
                    for (o, v) in row.iter_mut().enumerate() {
                        *v = g_n[o * d.oh + t];
                    }
                }
            });
        let win = self.gather_windows(d, x);
        let mut packed = vec![T::default(); d.out * k + d.out];
        let (dw, db) = packed.split_at_mut(d.out * k);
        matmul_into(
            (d.out, k, m),
            dw,
            None,
            (&gz, 1, d.out),
            (&win, k, 1),
            Threads::Pool,
        );
        drop(win);
        for row in gz.chunks(d.out) {
            for (acc, &v) in db.iter_mut().zip(row) {
                *acc += v;
            }
        }
        if input_grad {
            let mut dwin = vec![T::default(); m * k];
            matmul_into(
                (m, k, d.out),
                &mut dwin,
                None,
                (&gz, d.out, 1),
                (w, k, 1),
                Threads::Pool,
            );
            let mut dx = vec![T::default(); d.b * d.image()];
            dx.par_chunks_mut(d.image())
                .enumerate()
                .for_each(|(n, dx_n)| {
                    for t in 0..d.oh {
                        let row = &dwin[(n * d.oh + t) * k..(n * d.oh + t + 1) * k];
                        for (a, &v) in dx_n[t * d.w..t * d.w + k].iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                });
            packed.append(&mut dx);
        }
        packed
    }

    /// The direct kernel's geometry, when it runs this convolution: stride 1, 3x3 with padding
    /// 0 to 2, [`DIRECT_CHANNELS`] channels in and out, on a CPU with AVX-512.
    fn direct(&self, d: &Dims) -> Option<Direct> {
        let fits = self.stride == 1
            && (self.kh, self.kw) == (3, 3)
            && self.padding < 3
            && DIRECT_CHANNELS.contains(&d.c)
            && DIRECT_CHANNELS.contains(&d.out);
        (fits && fits_cpu()).then_some(Direct {
            c: d.c,
            h: d.h,
            w: d.w,
            out: d.out,
            padding: self.padding,
        })
    }

    /// [`Self::forward`] on the direct kernel: per image, the padded copy and one pass.
    fn forward_direct<T: Real>(
        &self,
        d: &Dims,
        direct: &Direct,
        x: &[T],
        w: &[T],
        bias: &[T],
    ) -> Vec<T> {
        let packed = direct.pack(w);
        let mut y = vec![T::default(); d.b * d.out * d.plane()];
        y.par_chunks_mut(d.out * d.plane())
            .enumerate()
            .for_each_init(
                || (vec![T::default(); direct.padded_len()], direct.scratch()),
                |(xp, scratch), (n, y_n)| {
                    direct.pad(&x[n * d.image()..(n + 1) * d.image()], xp);
                    direct.forward(xp, &packed, Some(bias), y_n, scratch);
                },
            );
        count_flops(d.b as u64 * direct.flops());
        y
    }

    fn forward<T: Real>(&self, d: &Dims, x: &[T], w: &[T], bias: &[T]) -> Vec<T> {
        if self.windows(d) {
            return self.forward_windows(d, x, w, bias);
        }
        if let Some(direct) = self.direct(d) {
            return self.forward_direct(d, &direct, x, w, bias);
        }
        let (rows, plane) = (d.rows((self.kh, self.kw)), d.plane());
        let mut y = vec![T::default(); d.b * d.out * plane];
        let scratch = if self.pointwise() { 0 } else { rows * plane };
        let threads = d.threads();
        y.par_chunks_mut(d.out * plane).enumerate().for_each_init(
            || vec![T::default(); scratch],
            |cols, (n, y_n)| {
                let x_n = &x[n * d.image()..(n + 1) * d.image()];
                let cols: &[T] = if self.pointwise() {
                    x_n
                } else {
                    self.gather(d, x_n, cols);
                    cols
                };
                for (o, line) in y_n.chunks_mut(plane).enumerate() {
                    line.fill(bias[o]);
                }
                matmul_into(
                    (d.out, plane, rows),
                    y_n,
                    Some(T::ONE),
                    (w, rows, 1),
                    (cols, plane, 1),
                    threads,
                );
            },
        );
        y
    }

    /// The convolution whose forward pass is this one's input gradient, for stride 1, a square
    /// kernel and "same" padding (`2 * padding = k - 1`, so no more arithmetic than the direct
    /// form): the output gradient convolved with the weights turned 180 degrees, their input
    /// and output channels swapped. Its im2col matrix has `out * k * k` rows, so the input
    /// gradient is one well-shaped product per image (the direct form, `weight^T x g` then adding
    /// the columns back onto the pixels, is a product over only `out` and a scatter `k * k` times
    /// over the image: a sixth of a resnet20 step). Its dims and weights (`[c, out, k, k]`).
    fn transposed<T: Real>(&self, d: &Dims, w: &[T]) -> Option<(Conv2d, Dims, Vec<T>)> {
        let k = self.kh;
        if self.stride != 1 || self.kw != k || 2 * self.padding + 1 != k {
            return None;
        }
        let op = Conv2d {
            kh: k,
            kw: k,
            padding: k - 1 - self.padding,
            stride: 1,
        };
        let dims = Dims {
            b: d.b,
            c: d.out,
            h: d.oh,
            w: d.ow,
            out: d.c,
            oh: d.h,
            ow: d.w,
        };
        Some((op, dims, turned(w, d.out, d.c, k * k)))
    }

    /// `[dweight, dbias, dx]` packed, `dx` only when `input_grad`.
    fn backward<T: Real>(&self, d: &Dims, x: &[T], w: &[T], g: &[T], input_grad: bool) -> Vec<T> {
        if self.windows(d) {
            return self.backward_windows(d, x, w, g, input_grad);
        }
        if let Some(direct) = self.direct(d) {
            return self.backward_direct(d, &direct, x, w, g, input_grad);
        }
        let (rows, plane) = (d.rows((self.kh, self.kw)), d.plane());
        let (nw, nb) = (d.out * rows, d.out);
        let scratch = if self.pointwise() { 0 } else { rows * plane };
        let threads = d.threads();
        let transposed = input_grad.then(|| self.transposed(d, w)).flatten();
        // The input gradient's scratch: the transposed convolution's im2col matrix, or the
        // gradient of this one's.
        let dscratch = match &transposed {
            _ if !input_grad => 0,
            Some((op, _, _)) if op.pointwise() => 0,
            Some((op, td, _)) => td.rows((op.kh, op.kw)) * td.plane(),
            None => rows * plane,
        };
        // Per task: partial weight and bias gradients, and the im2col scratch buffers.
        let start = || {
            (
                vec![T::default(); nw + nb],
                (vec![T::default(); scratch], vec![T::default(); dscratch]),
            )
        };
        let image = |(mut acc, (mut cols, mut dcols)): (Vec<T>, (Vec<T>, Vec<T>)),
                     n: usize,
                     dx_n: Option<&mut [T]>| {
            let x_n = &x[n * d.image()..(n + 1) * d.image()];
            let g_n = &g[n * d.out * plane..(n + 1) * d.out * plane];
            let cols_n: &[T] = if self.pointwise() {
                x_n
            } else {
                self.gather(d, x_n, &mut cols);
                &cols
            };
            let (dw, db) = acc.split_at_mut(nw);
            // dweight += g_n [out, plane] x cols_n^T [plane, rows]
            matmul_into(
                (d.out, rows, plane),
                dw,
                Some(T::ONE),
                (g_n, plane, 1),
                (cols_n, 1, plane),
                threads,
            );
            for (o, line) in g_n.chunks(plane).enumerate() {
                db[o] += line.iter().fold(T::default(), |s, &v| s + v);
            }
            match (dx_n, &transposed) {
                (Some(dx_n), Some((op, td, turned))) => {
                    // dx = turned [c, out k k] x im2col(g_n) [out k k, h w]
                    let trows = td.rows((op.kh, op.kw));
                    let g_cols: &[T] = if op.pointwise() {
                        g_n
                    } else {
                        op.gather(td, g_n, &mut dcols);
                        &dcols
                    };
                    matmul_into(
                        (d.c, td.plane(), trows),
                        dx_n,
                        None,
                        (turned, trows, 1),
                        (g_cols, td.plane(), 1),
                        threads,
                    );
                }
                (Some(dx_n), None) => {
                    // dcols = weight^T [rows, out] x g_n [out, plane], then back onto the pixels.
                    matmul_into(
                        (rows, plane, d.out),
                        &mut dcols,
                        None,
                        (w, 1, rows),
                        (g_n, plane, 1),
                        threads,
                    );
                    self.scatter(d, &mut dcols, dx_n);
                }
                (None, _) => {}
            }
            (acc, (cols, dcols))
        };
        over_images(d, input_grad, nw + nb, start, image)
    }

    /// [`Self::backward`] on the direct kernel: per image, the weight gradient from the padded
    /// image, and the input gradient as the transposed convolution's forward pass on the padded
    /// output gradient.
    fn backward_direct<T: Real>(
        &self,
        d: &Dims,
        direct: &Direct,
        x: &[T],
        w: &[T],
        g: &[T],
        input_grad: bool,
    ) -> Vec<T> {
        let plane = d.plane();
        let (nw, nb) = (d.out * d.rows((3, 3)), d.out);
        let back = direct.transposed();
        let turned = input_grad.then(|| back.pack(&direct.turn(w)));
        // Per task: partial weight and bias gradients; the padded image and the transposed
        // output gradient; the padded output gradient and a pass's scratch.
        let start = || {
            let lens = if input_grad {
                [back.padded_len(), back.scratch::<T>().len()]
            } else {
                [0, 0]
            };
            (
                vec![T::default(); nw + nb],
                [
                    direct.padded_len(),
                    direct.grad_scratch::<T>().len(),
                    lens[0],
                    lens[1],
                ]
                .map(|len| vec![T::default(); len]),
            )
        };
        let image =
            |(mut acc, mut bufs): (Vec<T>, [Vec<T>; 4]), n: usize, dx_n: Option<&mut [T]>| {
                let x_n = &x[n * d.image()..(n + 1) * d.image()];
                let g_n = &g[n * d.out * plane..(n + 1) * d.out * plane];
                let [xp, gt, gp, pass] = &mut bufs;
                let (dw, db) = acc.split_at_mut(nw);
                direct.pad(x_n, xp);
                direct.weight_grad(xp, g_n, dw, gt);
                for (o, line) in g_n.chunks(plane).enumerate() {
                    db[o] += line.iter().fold(T::default(), |s, &v| s + v);
                }
                if let (Some(dx_n), Some(turned)) = (dx_n, &turned) {
                    back.pad(g_n, gp);
                    back.forward(gp, turned, None, dx_n, pass);
                }
                (acc, bufs)
            };
        let flops = direct.flops() * if input_grad { 2 } else { 1 };
        count_flops(d.b as u64 * flops);
        over_images(d, input_grad, nw + nb, start, image)
    }
}

/// Runs `image(state, n, dx_n)` over a batch's images in fixed runs (each run's `state`, from
/// `start`, is allocated once), with `dx_n` image `n`'s slice of the input gradient when
/// `input_grad`; returns the runs' partial sums (the state's first vector, `len` long) added
/// in run order, then the input gradient. The runs do not depend on the pool's size: the
/// gradient is the same however many threads run it, and however the pool schedules them.
fn over_images<T: Real, B: Send>(
    d: &Dims,
    input_grad: bool,
    len: usize,
    start: impl Fn() -> (Vec<T>, B) + Sync,
    image: impl Fn((Vec<T>, B), usize, Option<&mut [T]>) -> (Vec<T>, B) + Sync,
) -> Vec<T> {
    let per_task = d.b.div_ceil(GRAD_TASKS).max(1);
    let mut dx = vec![T::default(); if input_grad { d.b * d.image() } else { 0 }];
    let tasks: Vec<Vec<T>> = if input_grad {
        dx.par_chunks_mut(d.image() * per_task)
            .enumerate()
            .map(|(t, dxs)| {
                let first = t * per_task;
                dxs.chunks_mut(d.image())
                    .enumerate()
                    .fold(start(), |state, (i, dx_n)| {
                        image(state, first + i, Some(dx_n))
                    })
                    .0
            })
            .collect()
    } else {
        (0..d.b.div_ceil(per_task))
            .into_par_iter()
            .map(|t| {
                (t * per_task..((t + 1) * per_task).min(d.b))
                    .fold(start(), |state, n| image(state, n, None))
                    .0
            })
            .collect()
    };
    let partials = tasks.into_iter().reduce(add_vectors);
    let mut packed = partials.unwrap_or_else(|| vec![T::default(); len]);
    packed.append(&mut dx);
    packed
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
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
        let d = self.dims(l1.shape(), l2.shape())?;
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, w, b| self
            .forward(&d, x, w, b));
        Ok((out, Shape::from((d.b, d.out, d.oh, d.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let input_grad = x.track_op();
        let packed = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &ConvGrad {
                op: *self,
                input_grad,
            },
        )?;
        let (nw, nb) = (weight.elem_count(), bias.elem_count());
        let dx = if input_grad {
            Some(
                packed
                    .narrow(0, nw + nb, x.elem_count())?
                    .reshape(x.shape())?,
            )
        } else {
            None
        };
        Ok((
            dx,
            Some(packed.narrow(0, 0, nw)?.reshape(weight.shape())?),
            Some(packed.narrow(0, nw, nb)?),
        ))
    }
}

/// The backward pass of [`Conv2d`] on `(x, weight, dy)`: `dweight`, `dbias` and (when the
/// input needs it) `dx`, packed into one vector.
struct ConvGrad {
    op: Conv2d,
    input_grad: bool,
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-backward"
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
        let d = self.op.dims(l1.shape(), l2.shape())?;
        if l3.shape().dims() != [d.b, d.out, d.oh, d.ow] {
            candle_core::bail!("conv2d-backward: gradient {:?} does not fit", l3.shape());
        }
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, w, g| self
            .op
            .backward(&d, x, w, g, self.input_grad));
        let len = l2.shape().elem_count()
            + d.out
            + if self.input_grad {
                l1.shape().elem_count()
            } else {
                0
            };
        Ok((out, Shape::from(len)))
    }
}

/// A `kh x kw` convolution of `x` (`[b, c, h, w]`) with `weight` (`[out, c, kh, kw]`) plus `bias`
/// (`[out]`), zero `padding`, `stride`: candle's `conv2d` followed by a bias, with a backward
/// pass that is one matrix product per image and gradient instead of candle's direct transposed
/// convolution, and no memory kept beyond the input.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (out, wc, kh, kw) = weight.dims4()?;
    if wc != c || bias.elem_count() != out || stride == 0 {
        return Err(Error::Invalid(format!(
            "conv2d: weight {:?} and bias {:?} do not fit input {:?} (stride {stride})",
            weight.dims(),
            bias.dims(),
            x.dims()
        )));
    }
    same_float("conv2d", &[x, weight, bias])?;
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.flatten_all()?.contiguous()?,
        Conv2d {
            kh,
            kw,
            padding,
            stride,
        },
    )?)
}
