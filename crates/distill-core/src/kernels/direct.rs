//! Direct stride-1 3x3 convolutions, for the layers with few channels (16 to 64: CIFAR ResNets)
//! where an im2col matrix and a matrix product spend more time moving data than multiplying.
//!
//! An image is copied once into a zero-padded buffer. Every tap of a window is then a fixed
//! offset into it, so [`LANES`] consecutive output positions of [`OB`] output channels add up in
//! registers while the loop walks the input channels and taps: one load of `LANES` inputs feeds
//! `OB` vector multiply-adds. Positions run over the padded width (a row's last two
//! positions are computed and dropped), so one loop covers every row whatever the width. The
//! weight gradient turns it around: per position, one load of `LANES` output
//! channels' gradients feeds one multiply-add per tap.
//!
//! Multiply-adds are fused ([`Real::fma`]) and the loops compiled for AVX-512 ([`wide`]); on
//! other CPUs ([`fits_cpu`]) the caller takes the im2col path. On one Zen 4 core, f32, 16
//! channels at 32x32 (a microbenchmark of these loops): the forward pass 98-109 GFLOP/s (peak
//! about 113), the weight gradient 75.

use super::Real;

/// The kernel's side.
const K: usize = 3;

/// Taps of the kernel.
const TAPS: usize = K * K;

/// Output channels one pass accumulates (their weights broadcast per tap).
const OB: usize = 8;

/// Consecutive output positions one pass accumulates (the vector lanes, unrolled).
const LANES: usize = 16;

/// Whether the CPU has the registers the passes are sized for: 32 vectors of 16 f32 lanes
/// (AVX-512, with its fused multiply-adds). With 16 registers of 8 lanes (AVX2) a pass's `OB x
/// LANES` partial sums would not fit, so the caller takes the im2col path there.
pub(super) fn fits_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Convolution weights `[out, c, k, k]` (`taps = k * k`) turned 180 degrees with their input
/// and output channels swapped, `[c, out, k, k]`: the weights of the transposed convolution,
/// whose forward pass is the input gradient.
pub(super) fn turned<T: Real>(w: &[T], out: usize, c: usize, taps: usize) -> Vec<T> {
    let mut turned = vec![T::default(); w.len()];
    for o in 0..out {
        for ci in 0..c {
            for t in 0..taps {
                turned[(ci * out + o) * taps + taps - 1 - t] = w[(o * c + ci) * taps + t];
            }
        }
    }
    turned
}

/// The `LANES` values of `s` from `at`.
#[inline(always)]
fn lanes<T>(s: &[T], at: usize) -> &[T; LANES] {
    match s[at..at + LANES].try_into() {
        Ok(v) => v,
        Err(_) => unreachable!("a slice of LANES elements"),
    }
}

/// One stride-1 convolution of a `[c, h, w]` image by a 3x3 kernel with `padding` (at most 2)
/// into `[out, oh, ow]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Direct {
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub out: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Direct {
    /// Padded height.
    fn hp(&self) -> usize {
        self.h + 2 * self.padding
    }

    /// Padded width: the row length of the padded image and of the positions.
    fn wp(&self) -> usize {
        self.w + 2 * self.padding
    }

    /// One padded plane.
    fn plane(&self) -> usize {
        self.hp() * self.wp()
    }

    /// Output height.
    pub fn oh(&self) -> usize {
        self.hp() + 1 - K
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        self.wp() + 1 - K
    }

    /// Positions computed per output channel: the output rows at the padded width, rounded up
    /// to whole passes.
    fn positions(&self) -> usize {
        (self.oh() * self.wp()).next_multiple_of(LANES)
    }

    /// Floating-point operations of one image's forward pass (two per multiply-add, valid
    /// positions only), as a product's are counted.
    pub fn flops(&self) -> u64 {
        (2 * self.out * self.c * TAPS * self.oh() * self.ow()) as u64
    }

    /// The length of a padded image: every plane, then the slack the last pass reads past it.
    pub fn padded_len(&self) -> usize {
        self.c * self.plane() + LANES + K
    }

    /// The transposed convolution: its forward pass on an output gradient `[out, oh, ow]` is
    /// the input gradient `[c, h, w]` (with the weights of [`Self::turn`]).
    pub fn transposed(&self) -> Direct {
        Direct {
            c: self.out,
            h: self.oh(),
            w: self.ow(),
            out: self.c,
            padding: K - 1 - self.padding,
        }
    }

    /// The weights `[out, c, 3, 3]` turned 180 degrees with their channels swapped: the
    /// weights of [`Self::transposed`], `[c, out, 3, 3]`.
    pub fn turn<T: Real>(&self, w: &[T]) -> Vec<T> {
        turned(w, self.out, self.c, TAPS)
    }

    /// Writes image `x` (`[c, h, w]`) into `xp` (of [`Self::padded_len`]) with zeros around it.
    pub fn pad<T: Real>(&self, x: &[T], xp: &mut [T]) {
        let (p, wp) = (self.padding, self.wp());
        xp.fill(T::default());
        for (c, plane) in x.chunks_exact(self.h * self.w).enumerate() {
            for (y, row) in plane.chunks_exact(self.w).enumerate() {
                let at = c * self.plane() + (y + p) * wp + p;
                xp[at..at + self.w].copy_from_slice(row);
            }
        }
    }

    /// The weights `[out, c, 3, 3]` in the order the forward pass reads them: per block of
    /// [`OB`] output channels, per input channel and tap, the block's `OB` weights (zeros past
    /// the last channel).
    pub fn pack<T: Real>(&self, w: &[T]) -> Vec<T> {
        let blocks = self.out.div_ceil(OB);
        let mut packed = vec![T::default(); blocks * self.c * TAPS * OB];
        for o in 0..self.out {
            let (block, lane) = (o / OB, o % OB);
            for c in 0..self.c {
                for t in 0..TAPS {
                    packed[((block * self.c + c) * TAPS + t) * OB + lane] =
                        w[(o * self.c + c) * TAPS + t];
                }
            }
        }
        packed
    }

    /// A scratch buffer for [`Self::forward`].
    pub fn scratch<T: Real>(&self) -> Vec<T> {
        vec![T::default(); self.out.next_multiple_of(OB) * self.positions()]
    }

    /// `y [out, oh, ow] = bias + conv(x)` from the padded image `xp` and the [`Self::pack`]ed
    /// weights (`bias` of `out` values, or none for zero).
    pub fn forward<T: Real>(
        &self,
        xp: &[T],
        packed: &[T],
        bias: Option<&[T]>,
        y: &mut [T],
        scratch: &mut [T],
    ) {
        // The loops are inlined into `wide`'s function compiled for the CPU's features
        // (compiled outside it, every multiply-add is a library call).
        wide!(self.forward_loops(xp, packed, scratch));
        let (wp, positions, oh, ow) = (self.wp(), self.positions(), self.oh(), self.ow());
        for (o, yo) in y.chunks_exact_mut(oh * ow).enumerate() {
            let b = bias.map_or(T::default(), |b| b[o]);
            let from = &scratch[o * positions..(o + 1) * positions];
            for (row, src) in yo.chunks_exact_mut(ow).zip(from.chunks(wp)) {
                for (v, &s) in row.iter_mut().zip(src) {
                    *v = s + b;
                }
            }
        }
    }

    /// [`Self::forward`]'s loops: writes output channel `o` at `scratch[o * positions..]`,
    /// every position at the padded width. (Written with index loops over constant bounds: the
    /// iterator form of the same loops kept the partial sums in memory and ran 30 times slower.)
    #[inline(always)]
    fn forward_loops<T: Real>(&self, xp: &[T], packed: &[T], scratch: &mut [T]) {
        let (wp, plane, positions) = (self.wp(), self.plane(), self.positions());
        for (block, weights) in packed.chunks_exact(self.c * TAPS * OB).enumerate() {
            for q in (0..positions).step_by(LANES) {
                let mut acc = [[T::default(); LANES]; OB];
                for c in 0..self.c {
                    let xc = &xp[c * plane + q..];
                    let wc = &weights[c * TAPS * OB..(c + 1) * TAPS * OB];
                    for i in 0..K {
                        for j in 0..K {
                            let xs = *lanes(xc, i * wp + j);
                            let t = i * K + j;
                            for ob in 0..OB {
                                let wv = wc[t * OB + ob];
                                for l in 0..LANES {
                                    acc[ob][l] = wv.fma(xs[l], acc[ob][l]);
                                }
                            }
                        }
                    }
                }
                for (ob, a) in acc.iter().enumerate() {
                    let at = (block * OB + ob) * positions + q;
                    scratch[at..at + LANES].copy_from_slice(a);
                }
            }
        }
    }

    /// A buffer for [`Self::weight_grad`]: the output gradient transposed, in blocks of
    /// `LANES` output channels, `[out / LANES rounded up, positions, LANES]`.
    pub fn grad_scratch<T: Real>(&self) -> Vec<T> {
        vec![T::default(); self.positions() * self.out.next_multiple_of(LANES)]
    }

    /// `dw [out, c, 3, 3] += g (x) x`: the output gradient `g` (`[out, oh, ow]`) against the
    /// padded image `xp`. Per input channel and block of `LANES` output channels, one vector
    /// of partial sums per tap: each position adds its `LANES` gradients times the tap's
    /// input. `gt` is a [`Self::grad_scratch`] buffer.
    pub fn weight_grad<T: Real>(&self, xp: &[T], g: &[T], dw: &mut [T], gt: &mut [T]) {
        let (wp, oh, ow) = (self.wp(), self.oh(), self.ow());
        let block_len = self.positions() * LANES;
        gt.fill(T::default());
        for (o, go) in g.chunks_exact(oh * ow).enumerate() {
            let block = &mut gt[o / LANES * block_len..(o / LANES + 1) * block_len];
            for (oy, row) in go.chunks_exact(ow).enumerate() {
                for (ox, &v) in row.iter().enumerate() {
                    block[(oy * wp + ox) * LANES + o % LANES] = v;
                }
            }
        }
        // Inlined into `wide` as in `forward`.
        wide!(self.weight_grad_loops(xp, gt, dw))
    }

    /// [`Self::weight_grad`]'s loops. The position loop zips iterators of known lengths and
    /// reads `acc` only whole vectors at a time: written with indices (a bounds check per
    /// tap) or read back lane by lane, the partial sums were stored to memory at every
    /// multiply-add, and the loop ran at half the speed (38 against 75 GFLOP/s on one core).
    #[inline(always)]
    fn weight_grad_loops<T: Real>(&self, xp: &[T], gt: &[T], dw: &mut [T]) {
        let (wp, plane, positions) = (self.wp(), self.plane(), self.positions());
        for (block, gb) in gt.chunks_exact(positions * LANES).enumerate() {
            for c in 0..self.c {
                let xc = &xp[c * plane..];
                let row = |i: usize| xc[i * wp..i * wp + positions + K - 1].windows(K);
                let mut acc = [[T::default(); LANES]; TAPS];
                for (((gv, r0), r1), r2) in
                    gb.chunks_exact(LANES).zip(row(0)).zip(row(1)).zip(row(2))
                {
                    let gv = lanes(gv, 0);
                    let xs = [
                        r0[0], r0[1], r0[2], r1[0], r1[1], r1[2], r2[0], r2[1], r2[2],
                    ];
                    for t in 0..TAPS {
                        for l in 0..LANES {
                            acc[t][l] = xs[t].fma(gv[l], acc[t][l]);
                        }
                    }
                }
                let mut sums = [T::default(); TAPS * LANES];
                for (t, a) in acc.iter().enumerate() {
                    sums[t * LANES..(t + 1) * LANES].copy_from_slice(a);
                }
                for l in 0..LANES.min(self.out - block * LANES) {
                    let o = block * LANES + l;
                    let dwo = &mut dw[(o * self.c + c) * TAPS..(o * self.c + c + 1) * TAPS];
                    for (t, d) in dwo.iter_mut().enumerate() {
                        *d += sums[t * LANES + l];
                    }
                }
            }
        }
    }
}
