//! One direction of an LSTM layer over a whole sequence as one op. The input contributions
//! `gates_in` (`[t, b, 4h]`, bias included) are read once, so the backward pass writes their
//! gradient once (a per-step slice of a tensor has a backward that fills a zero tensor of the
//! whole shape: T steps cost T full-size tensors). The recurrence is one `[b, h] x [h, 4h]`
//! product per step, in the data's own precision; the backward pass recomputes every step's
//! gate pre-activations in one product over the whole sequence and the recurrent weight's
//! gradient in another, leaving only the `[b, 4h] x [4h, h]` product per step sequential.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{Threads, matmul_into};
use super::{Float, contiguous, same_float};
use crate::{Error, Result};

fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// Rows of the batch per parallel task of the cell arithmetic.
const ROWS: usize = 8;

/// One cell step of one batch row: pre-activations `g` (`[4h]`, PyTorch's order i, f, g, o),
/// the state before (`[h | c]`) and the mask value (0 keeps the state); writes the state after.
fn cell<T: Float>(g: &[T], before: &[T], m: T, after: &mut [T]) {
    let h = before.len() / 2;
    for j in 0..h {
        let (i, f) = (sigmoid(g[j]), sigmoid(g[h + j]));
        let (gg, og) = (g[2 * h + j].tanh(), sigmoid(g[3 * h + j]));
        let (h_old, c_old) = (before[j], before[h + j]);
        let c_new = f * c_old + i * gg;
        let h_new = og * c_new.tanh();
        after[j] = h_old + m * (h_new - h_old);
        after[h + j] = c_old + m * (c_new - c_old);
    }
}

/// The backward pass of [`cell`] for one row: from `g`, the state before and `carry` (the
/// gradient of the state after, `[dh | dc]`), writes the pre-activation gradient `dg` and
/// replaces `carry` with the gradient of the state before (without the recurrent product's
/// part, which the caller adds).
fn cell_backward<T: Float>(g: &[T], before: &[T], m: T, carry: &mut [T], dg: &mut [T]) {
    let h = before.len() / 2;
    for j in 0..h {
        let (i, f) = (sigmoid(g[j]), sigmoid(g[h + j]));
        let (gg, og) = (g[2 * h + j].tanh(), sigmoid(g[3 * h + j]));
        let c_old = before[h + j];
        let tc = (f * c_old + i * gg).tanh();
        let (dh_out, dc_out) = (carry[j], carry[h + j]);
        let dh_new = m * dh_out;
        let dc_new = m * dc_out + dh_new * og * (T::ONE - tc * tc);
        dg[j] = dc_new * gg * i * (T::ONE - i);
        dg[h + j] = dc_new * c_old * f * (T::ONE - f);
        dg[2 * h + j] = dc_new * i * (T::ONE - gg * gg);
        dg[3 * h + j] = dh_new * tc * og * (T::ONE - og);
        carry[j] = (T::ONE - m) * dh_out;
        carry[h + j] = (T::ONE - m) * dc_out + dc_new * f;
    }
}

/// `(gates_in [t, b, 4h], w_hh [4h, h], mask [b, t])` -> the state `[h | c]` after every step,
/// in the order taken (`[t, b, 2h]`).
#[derive(Clone, Copy)]
struct LstmLayer {
    backwards: bool,
}

impl LstmLayer {
    /// The step index of the `k`-th step taken.
    fn step(&self, k: usize, t: usize) -> usize {
        if self.backwards { t - 1 - k } else { k }
    }

    fn forward<T: Float>(
        &self,
        (t, b, h): (usize, usize, usize),
        gi: &[T],
        w: &[T],
        mask: &[T],
    ) -> Vec<T> {
        let (g4, s2) = (4 * h, 2 * h);
        let mut out = vec![T::default(); t * b * s2];
        let zeros = vec![T::default(); b * s2];
        let mut pre = vec![T::default(); b * g4];
        for k in 0..t {
            let s = self.step(k, t);
            let (done, rest) = out.split_at_mut(k * b * s2);
            let before: &[T] = if k == 0 {
                &zeros
            } else {
                &done[(k - 1) * b * s2..]
            };
            pre.copy_from_slice(&gi[s * b * g4..(s + 1) * b * g4]);
            matmul_into(
                (b, g4, h),
                &mut pre,
                Some(T::ONE),
                (before, s2, 1),
                (w, 1, h),
                Threads::Pool,
            );
            rest[..b * s2]
                .par_chunks_mut(s2)
                .enumerate()
                .with_min_len(ROWS)
                .for_each(|(r, after)| {
                    cell(
                        &pre[r * g4..(r + 1) * g4],
                        &before[r * s2..(r + 1) * s2],
                        mask[r * t + s],
                        after,
                    )
                });
        }
        out
    }

    /// `d gates_in` (`[t, b, 4h]`, step order) then `d w_hh` (`[4h, h]`), in one vector.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Float>(
        &self,
        (t, b, h): (usize, usize, usize),
        gi: &[T],
        w: &[T],
        mask: &[T],
        states: &[T],
        grad: &[T],
    ) -> Vec<T> {
        let (g4, s2, n) = (4 * h, 2 * h, t * b);
        // The state before every step taken, and the pre-activations of every step: one
        // product for the whole sequence.
        let mut before = vec![T::default(); n * s2];
        if t > 1 {
            before[b * s2..].copy_from_slice(&states[..(t - 1) * b * s2]);
        }
        let mut pre = vec![T::default(); n * g4];
        for k in 0..t {
            let s = self.step(k, t);
            pre[k * b * g4..(k + 1) * b * g4].copy_from_slice(&gi[s * b * g4..(s + 1) * b * g4]);
        }
        matmul_into(
            (n, g4, h),
            &mut pre,
            Some(T::ONE),
            (&before, s2, 1),
            (w, 1, h),
            Threads::Pool,
        );
        let mut dg = vec![T::default(); n * g4];
        let mut carry = vec![T::default(); b * s2];
        let mut dh = vec![T::default(); b * h];
        for k in (0..t).rev() {
            let s = self.step(k, t);
            let rows = k * b..(k + 1) * b;
            carry
                .iter_mut()
                .zip(&grad[rows.start * s2..rows.end * s2])
                .for_each(|(c, &g)| *c += g);
            carry
                .par_chunks_mut(s2)
                .zip(dg[rows.start * g4..rows.end * g4].par_chunks_mut(g4))
                .enumerate()
                .with_min_len(ROWS)
                .for_each(|(r, (c, d))| {
                    let row = rows.start + r;
                    cell_backward(
                        &pre[row * g4..(row + 1) * g4],
                        &before[row * s2..(row + 1) * s2],
                        mask[r * t + s],
                        c,
                        d,
                    )
                });
            // The recurrent product's part: dh_before = dg [b, 4h] x w_hh [4h, h].
            matmul_into(
                (b, h, g4),
                &mut dh,
                None,
                (&dg[rows.start * g4..], g4, 1),
                (w, h, 1),
                Threads::Pool,
            );
            for (c, d) in carry.chunks_mut(s2).zip(dh.chunks(h)) {
                c[..h].iter_mut().zip(d).for_each(|(c, &d)| *c += d);
            }
        }
        // d w_hh = dg^T [4h, n] x h_before [n, h]: one product for the whole sequence.
        let mut dw = vec![T::default(); g4 * h];
        matmul_into(
            (g4, h, n),
            &mut dw,
            None,
            (&dg, 1, g4),
            (&before, s2, 1),
            Threads::Pool,
        );
        let mut packed = if self.backwards {
            let mut d_in = vec![T::default(); n * g4];
            for k in 0..t {
                let s = self.step(k, t);
                d_in[s * b * g4..(s + 1) * b * g4]
                    .copy_from_slice(&dg[k * b * g4..(k + 1) * b * g4]);
            }
            d_in
        } else {
            dg
        };
        packed.extend_from_slice(&dw);
        packed
    }

    /// [`LstmLayer::backward`] on tensors of one float type.
    fn backward_of<T: Float>(
        &self,
        dims: (usize, usize, usize),
        t: [&Tensor; 5],
    ) -> candle_core::Result<Vec<T>> {
        let v = |x: &Tensor| x.flatten_all()?.to_vec1::<T>();
        Ok(self.backward(dims, &v(t[0])?, &v(t[1])?, &v(t[2])?, &v(t[3])?, &v(t[4])?))
    }
}

impl CustomOp3 for LstmLayer {
    fn name(&self) -> &'static str {
        "lstm-layer"
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
        let (t, b, four_h) = l1.shape().dims3()?;
        let dims = (t, b, four_h / 4);
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |gi, w, m| self
            .forward(dims, gi, w, m));
        Ok((out, Shape::from((t, b, four_h / 2))))
    }

    fn bwd(
        &self,
        gates_in: &Tensor,
        w_hh: &Tensor,
        mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t, b, four_h) = gates_in.dims3()?;
        let dims = (t, b, four_h / 4);
        let tensors = [gates_in, w_hh, mask, res, grad];
        let packed = match gates_in.dtype() {
            DType::F32 => Tensor::new(self.backward_of::<f32>(dims, tensors)?, gates_in.device())?,
            DType::F64 => Tensor::new(self.backward_of::<f64>(dims, tensors)?, gates_in.device())?,
            other => candle_core::bail!("lstm-layer: f32 or f64, got {other:?}"),
        };
        let n = gates_in.elem_count();
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(gates_in.shape())?),
            Some(
                packed
                    .narrow(0, n, w_hh.elem_count())?
                    .reshape(w_hh.shape())?,
            ),
            None,
        ))
    }
}

/// One direction of an LSTM layer (PyTorch's gate order i, f, g, o) over a sequence, as one op:
/// `gates_in` (`[t, b, 4h]`: the input contributions with the bias, time-major), the recurrent
/// weight `w_hh` (`[4h, h]`) and `mask` (`[b, t]`; a padded step, 0, leaves the state as it is).
/// Returns the state `[h | c]` after every step taken (`[t, b, 2h]`, in the order taken:
/// reversed when `backwards`). Backpropagation through time runs inside the op.
pub fn lstm_layer(
    gates_in: &Tensor,
    w_hh: &Tensor,
    mask: &Tensor,
    backwards: bool,
) -> Result<Tensor> {
    let (t, b, four_h) = gates_in.dims3()?;
    if four_h % 4 != 0 || w_hh.dims() != [four_h, four_h / 4] || mask.dims() != [b, t] {
        return Err(Error::Invalid(format!(
            "lstm_layer: gates {:?}, w_hh {:?} and mask {:?} do not fit",
            gates_in.dims(),
            w_hh.dims(),
            mask.dims()
        )));
    }
    same_float("lstm_layer", &[gates_in, w_hh])?;
    let mask = mask.to_dtype(gates_in.dtype())?.contiguous()?;
    Ok(gates_in
        .contiguous()?
        .apply_op3(&w_hh.contiguous()?, &mask, LstmLayer { backwards })?)
}

#[cfg(test)]
mod tests {
    use super::Float;

    /// The polynomial `exp` and the `tanh` built on it against the standard library's.
    #[test]
    fn fast_exp_and_tanh_match_the_standard_library() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (ours, std) = (Float::exp(x), x.exp());
            assert!(
                (ours - std).abs() <= 1e-6 * std,
                "exp({x}): {ours} vs {std}"
            );
            let (ours, std) = (Float::tanh(x), x.tanh());
            assert!((ours - std).abs() <= 1e-6, "tanh({x}): {ours} vs {std}");
        }
    }
}
