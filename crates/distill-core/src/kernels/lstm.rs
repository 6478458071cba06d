//! A bidirectional LSTM layer over a whole sequence as one op, giving both directions' final
//! hidden states (what a BiLSTM classifier reads). The input contributions (`[t, b, 4h]` per
//! direction, bias included) are read once, so the backward pass writes their gradient once (a
//! per-step slice of a tensor has a backward that fills a zero tensor of the whole shape: T
//! steps cost T full-size tensors). The two directions run side by side, one thread each: each
//! step is one `[b, h] x [h, 4h]` product and the cell arithmetic, and split over two threads
//! every step would wait for both. The forward pass keeps every step's gate activations and
//! states inside the op (as PyTorch's saved tensors), so the backward pass neither recomputes
//! them nor copies its inputs: per step it is the cell's derivative and one `[b, 4h] x [4h, h]`
//! product, and each recurrent weight's gradient is one product over the whole sequence.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::matmul::{Threads, matmul_into};
use super::{Float, contiguous, same_float};
use crate::{Error, Result};

fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// Splits a row of gates (`[4h]`, PyTorch's order i, f, g, o) into its four parts.
fn quarters<T>(g: &mut [T]) -> [&mut [T]; 4] {
    let h = g.len() / 4;
    let (i, rest) = g.split_at_mut(h);
    let (f, rest) = rest.split_at_mut(h);
    let (gg, o) = rest.split_at_mut(h);
    [i, f, gg, o]
}

/// One cell step of one batch row: turns the pre-activations `g` (`[4h]`) into the gates'
/// activations in place (what the backward pass reads), and from the state before (`[h | c]`)
/// and the mask value (0 keeps the state) writes the state after. Zipped slices, no indexing:
/// the loop vectorises.
fn cell<T: Float>(g: &mut [T], before: &[T], m: T, after: &mut [T]) {
    let h = before.len() / 2;
    let [gi, gf, gg, go] = quarters(g);
    let (h_old, c_old) = before.split_at(h);
    let (h_new, c_new) = after.split_at_mut(h);
    let gates = gi
        .iter_mut()
        .zip(gf.iter_mut())
        .zip(gg.iter_mut())
        .zip(go.iter_mut());
    let states = h_old
        .iter()
        .zip(c_old)
        .zip(h_new.iter_mut().zip(c_new.iter_mut()));
    for ((((i, f), g), o), ((&ho, &co), (hn, cn))) in gates.zip(states) {
        (*i, *f, *g, *o) = (sigmoid(*i), sigmoid(*f), g.tanh(), sigmoid(*o));
        let c = *f * co + *i * *g;
        let hh = *o * c.tanh();
        *hn = ho + m * (hh - ho);
        *cn = co + m * (c - co);
    }
}

/// The backward pass of [`cell`] for one row: from the gates' activations `a`, the state
/// before and `carry` (the gradient of the state after, `[dh | dc]`), writes the
/// pre-activation gradient `dg` and replaces `carry` with the gradient of the state before
/// (without the recurrent product's part, which the caller adds).
fn cell_backward<T: Float>(a: &[T], before: &[T], m: T, carry: &mut [T], dg: &mut [T]) {
    let h = before.len() / 2;
    let (ai, rest) = a.split_at(h);
    let (af, rest) = rest.split_at(h);
    let (ag, ao) = rest.split_at(h);
    let [di, df, dgg, dout] = quarters(dg);
    let (dh, dc) = carry.split_at_mut(h);
    let gates = ai.iter().zip(af).zip(ag).zip(ao);
    let grads = di
        .iter_mut()
        .zip(df.iter_mut())
        .zip(dgg.iter_mut())
        .zip(dout.iter_mut());
    let state = before[h..].iter().zip(dh.iter_mut().zip(dc.iter_mut()));
    for ((((&i, &f), &gg), &og), ((((di, df), dgg), dout), (&c_old, (dh, dc)))) in
        gates.zip(grads.zip(state))
    {
        let tc = (f * c_old + i * gg).tanh();
        let (dh_out, dc_out) = (*dh, *dc);
        let dh_new = m * dh_out;
        let dc_new = m * dc_out + dh_new * og * (T::ONE - tc * tc);
        *di = dc_new * gg * i * (T::ONE - i);
        *df = dc_new * c_old * f * (T::ONE - f);
        *dgg = dc_new * i * (T::ONE - gg * gg);
        *dout = dh_new * tc * og * (T::ONE - og);
        *dh = (T::ONE - m) * dh_out;
        *dc = (T::ONE - m) * dc_out + dc_new * f;
    }
}

/// The time index of the `k`-th step taken.
fn step(backwards: bool, k: usize, t: usize) -> usize {
    if backwards { t - 1 - k } else { k }
}

/// The state before step `k` (`[b, 2h]`; zeros before the first) and the state slot `k` writes,
/// both in `states` (`[t, b, 2h]`, time order).
fn before_and_after<'a, T>(
    states: &'a mut [T],
    zeros: &'a [T],
    (backwards, k, t, width): (bool, usize, usize, usize),
) -> (&'a [T], &'a mut [T]) {
    let s = step(backwards, k, t);
    if k == 0 {
        return (zeros, &mut states[s * width..(s + 1) * width]);
    }
    let p = step(backwards, k - 1, t);
    if p < s {
        let (left, right) = states.split_at_mut(s * width);
        (&left[p * width..(p + 1) * width], &mut right[..width])
    } else {
        let (left, right) = states.split_at_mut(p * width);
        (&right[..width], &mut left[s * width..(s + 1) * width])
    }
}

/// What one direction's forward pass gives: its gates' activations and states (time order).
type Run<T> = (Vec<T>, Vec<T>);

/// One direction's recurrence on one thread: `(t, b, h)`, whether it reads backwards.
#[derive(Clone, Copy)]
struct Direction {
    dims: (usize, usize, usize),
    backwards: bool,
}

impl Direction {
    /// The gates' activations and the state `[h | c]` after every step (`[t, b, 4h]` and
    /// `[t, b, 2h]`, time order) from the input contributions `gi` and the recurrent weight `w`.
    #[inline(always)]
    fn forward<T: Float>(&self, gi: &[T], w: &[T], mask: &[T]) -> Run<T> {
        let (t, b, h) = self.dims;
        let (g4, s2) = (4 * h, 2 * h);
        let mut gates = gi.to_vec();
        let mut states = vec![T::default(); t * b * s2];
        let zeros = vec![T::default(); b * s2];
        for k in 0..t {
            let s = step(self.backwards, k, t);
            let (before, after) =
                before_and_after(&mut states, &zeros, (self.backwards, k, t, b * s2));
            let gates_s = &mut gates[s * b * g4..(s + 1) * b * g4];
            let lhs = (before, s2, 1);
            matmul_into(
                (b, g4, h),
                gates_s,
                Some(T::ONE),
                lhs,
                (w, 1, h),
                Threads::One,
            );
            for (r, (after, g)) in after.chunks_mut(s2).zip(gates_s.chunks_mut(g4)).enumerate() {
                cell(g, &before[r * s2..(r + 1) * s2], mask[r * t + s], after);
            }
        }
        (gates, states)
    }

    /// The hidden state after the last step taken (`[b, h]`) of `states`.
    fn final_state<'a, T>(&self, states: &'a [T]) -> impl Iterator<Item = &'a [T]> {
        let (t, b, h) = self.dims;
        let last = step(self.backwards, t - 1, t);
        states[last * b * 2 * h..(last + 1) * b * 2 * h]
            .chunks(2 * h)
            .map(move |row| &row[..h])
    }

    /// Writes `d gates_in` (`dg`: `[t, b, 4h]`, time order) and `d w_hh` (`dw`: `[4h, h]`)
    /// from the gradient of the final hidden state (`grad`: `[b, h]`, rows `stride` apart).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Float>(
        &self,
        (w, mask): (&[T], &[T]),
        (grad, stride): (&[T], usize),
        (gates, states): (&[T], &[T]),
        dg: &mut [T],
        dw: &mut [T],
    ) {
        let (t, b, h) = self.dims;
        let (g4, s2) = (4 * h, 2 * h);
        let zeros = vec![T::default(); b * s2];
        // [dh | dc] of the state after the step at hand, starting with the final state's.
        let mut carry = vec![T::default(); b * s2];
        for (r, c) in carry.chunks_mut(s2).enumerate() {
            c[..h].copy_from_slice(&grad[r * stride..r * stride + h]);
        }
        let mut dh = vec![T::default(); b * h];
        for k in (0..t).rev() {
            let s = step(self.backwards, k, t);
            let before = if k == 0 {
                &zeros[..]
            } else {
                let p = step(self.backwards, k - 1, t);
                &states[p * b * s2..(p + 1) * b * s2]
            };
            let dg_s = &mut dg[s * b * g4..(s + 1) * b * g4];
            for (r, (c, d)) in carry.chunks_mut(s2).zip(dg_s.chunks_mut(g4)).enumerate() {
                let row = s * b + r;
                let g = &gates[row * g4..(row + 1) * g4];
                cell_backward(g, &before[r * s2..(r + 1) * s2], mask[r * t + s], c, d);
            }
            // The recurrent product's part: dh_before = dg [b, 4h] x w_hh [4h, h].
            matmul_into(
                (b, h, g4),
                &mut dh,
                None,
                (dg_s, g4, 1),
                (w, h, 1),
                Threads::One,
            );
            for (c, d) in carry.chunks_mut(s2).zip(dh.chunks(h)) {
                c[..h].iter_mut().zip(d).for_each(|(c, &d)| *c += d);
            }
        }
        // d w_hh = sum over steps of dg^T h_before: one product over the steps after the first
        // taken (the first starts from zeros), each paired with the state of the step before,
        // which is the time slot before it (forwards) or after it (backwards).
        dw.fill(T::default());
        if t > 1 {
            let rows = (t - 1) * b;
            let (dg_from, state_from) = if self.backwards { (0, b) } else { (b, 0) };
            matmul_into(
                (g4, h, rows),
                dw,
                None,
                (&dg[dg_from * g4..], 1, g4),
                (&states[state_from * s2..], s2, 1),
                Threads::Pool,
            );
        }
    }
}

/// What the forward pass keeps for the backward pass, per direction and in time order: the gate
/// activations (`[t, b, 4h]`) and the state `[h | c]` after each step (`[t, b, 2h]`).
struct Saved {
    gates: [CpuStorage; 2],
    states: [CpuStorage; 2],
    mask: CpuStorage,
}

/// `(gates_forward [t, b, 4h], gates_backward [t, b, 4h], w_hh of both [8h, h])` -> the final
/// hidden states `[b, 2h]` (forwards, then backwards). The mask is data, so it is part of the
/// op rather than an input.
struct BiLstm {
    mask: CpuStorage,
    saved: OnceLock<Arc<Saved>>,
}

/// The two directions of a `(t, b, h)` layer.
fn directions(dims: (usize, usize, usize)) -> [Direction; 2] {
    [false, true].map(|backwards| Direction { dims, backwards })
}

impl BiLstm {
    fn forward<T: Float>(
        dims @ (_, b, h): (usize, usize, usize),
        gates: [&[T]; 2],
        w: &[T],
        mask: &[T],
    ) -> ([Run<T>; 2], Vec<T>) {
        let [f, r] = directions(dims);
        let (w_f, w_r) = w.split_at(4 * h * h);
        let (a, z) = rayon::join(
            || wide!(f.forward(gates[0], w_f, mask)),
            || wide!(r.forward(gates[1], w_r, mask)),
        );
        let mut out = Vec::with_capacity(b * 2 * h);
        for (x, y) in f.final_state(&a.1).zip(r.final_state(&z.1)) {
            out.extend_from_slice(x);
            out.extend_from_slice(y);
        }
        ([a, z], out)
    }
}

impl CustomOp3 for BiLstm {
    fn name(&self) -> &'static str {
        "bilstm"
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
        let n = self.name();
        let (saved, out) = match (s1, s2, s3, &self.mask) {
            (CpuStorage::F32(f), CpuStorage::F32(r), CpuStorage::F32(w), CpuStorage::F32(m)) => {
                let gates = [contiguous(f, l1, n)?, contiguous(r, l2, n)?];
                let ([a, z], out) = Self::forward(dims, gates, contiguous(w, l3, n)?, m);
                let saved = Saved {
                    gates: [CpuStorage::F32(a.0), CpuStorage::F32(z.0)],
                    states: [CpuStorage::F32(a.1), CpuStorage::F32(z.1)],
                    mask: self.mask.clone(),
                };
                (saved, CpuStorage::F32(out))
            }
            (CpuStorage::F64(f), CpuStorage::F64(r), CpuStorage::F64(w), CpuStorage::F64(m)) => {
                let gates = [contiguous(f, l1, n)?, contiguous(r, l2, n)?];
                let ([a, z], out) = Self::forward(dims, gates, contiguous(w, l3, n)?, m);
                let saved = Saved {
                    gates: [CpuStorage::F64(a.0), CpuStorage::F64(z.0)],
                    states: [CpuStorage::F64(a.1), CpuStorage::F64(z.1)],
                    mask: self.mask.clone(),
                };
                (saved, CpuStorage::F64(out))
            }
            _ => candle_core::bail!("{n}: f32 or f64 tensors of one dtype"),
        };
        // Each application of the op is a new value: this runs once per instance.
        let _ = self.saved.set(Arc::new(saved));
        Ok((out, Shape::from((b, four_h / 2))))
    }

    fn bwd(
        &self,
        gates_f: &Tensor,
        gates_r: &Tensor,
        w_hh: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("bilstm: backward before forward");
        };
        let (t, b, four_h) = gates_f.dims3()?;
        let op = BiLstmGrad {
            dims: (t, b, four_h / 4),
            saved: Arc::clone(saved),
        };
        let packed = w_hh.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let (n, nw) = (gates_f.elem_count(), w_hh.elem_count());
        let part =
            |start: usize, len: usize, shape: &Shape| packed.narrow(0, start, len)?.reshape(shape);
        Ok((
            Some(part(0, n, gates_f.shape())?),
            Some(part(n, n, gates_r.shape())?),
            Some(part(2 * n, nw, w_hh.shape())?),
        ))
    }
}

/// The backward pass of [`BiLstm`] on `(w_hh of both, d final states)` with the forward pass's
/// saved values and the mask: `d gates_forward`, `d gates_backward`, `d w_hh` in one vector.
struct BiLstmGrad {
    dims: (usize, usize, usize),
    saved: Arc<Saved>,
}

impl BiLstmGrad {
    fn backward<T: Float>(
        &self,
        w: &[T],
        grad: &[T],
        mask: &[T],
        (gates, states): ([&[T]; 2], [&[T]; 2]),
    ) -> Vec<T> {
        let (t, b, h) = self.dims;
        let (n, nw) = (t * b * 4 * h, 4 * h * h);
        let mut out = vec![T::default(); 2 * n + 2 * nw];
        let (dg, dw) = out.split_at_mut(2 * n);
        let (dg_f, dg_r) = dg.split_at_mut(n);
        let (dw_f, dw_r) = dw.split_at_mut(nw);
        let (w_f, w_r) = w.split_at(nw);
        let [f, r] = directions(self.dims);
        rayon::join(
            || {
                wide!({
                    f.backward(
                        (w_f, mask),
                        (grad, 2 * h),
                        (gates[0], states[0]),
                        dg_f,
                        dw_f,
                    )
                })
            },
            || {
                wide!({
                    r.backward(
                        (w_r, mask),
                        (&grad[h..], 2 * h),
                        (gates[1], states[1]),
                        dg_r,
                        dw_r,
                    )
                })
            },
        );
        out
    }
}

impl candle_core::CustomOp2 for BiLstmGrad {
    fn name(&self) -> &'static str {
        "bilstm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Saved {
            gates,
            states,
            mask,
        } = &*self.saved;
        let n = self.name();
        let out = match (s1, s2, mask, gates, states) {
            (
                CpuStorage::F32(w),
                CpuStorage::F32(g),
                CpuStorage::F32(m),
                [CpuStorage::F32(p0), CpuStorage::F32(p1)],
                [CpuStorage::F32(s0), CpuStorage::F32(s1)],
            ) => CpuStorage::F32(self.backward(
                contiguous(w, l1, n)?,
                contiguous(g, l2, n)?,
                m,
                ([p0, p1], [s0, s1]),
            )),
            (
                CpuStorage::F64(w),
                CpuStorage::F64(g),
                CpuStorage::F64(m),
                [CpuStorage::F64(p0), CpuStorage::F64(p1)],
                [CpuStorage::F64(s0), CpuStorage::F64(s1)],
            ) => CpuStorage::F64(self.backward(
                contiguous(w, l1, n)?,
                contiguous(g, l2, n)?,
                m,
                ([p0, p1], [s0, s1]),
            )),
            _ => candle_core::bail!("{n}: f32 or f64 tensors of one dtype"),
        };
        let (t, b, h) = self.dims;
        Ok((out, Shape::from(2 * t * b * 4 * h + 2 * 4 * h * h)))
    }
}

/// A bidirectional LSTM layer (PyTorch's gate order i, f, g, o) over a sequence, as one op,
/// giving the final hidden states: `gates` holds each direction's input contributions with its
/// bias (`[t, b, 4h]`, time-major; forwards first), `w_hh` each direction's recurrent weight
/// (`[4h, h]`), `mask` (`[b, t]`) 1 on tokens and 0 on padding (a padded step leaves the state
/// as it is). Returns `[b, 2h]`: the forward direction's hidden state after the sentence's
/// last token, then the backward direction's after its first. The directions run side by side;
/// backpropagation through time runs inside the op. The mask gets no gradient.
pub fn bilstm_final_states(
    gates: [&Tensor; 2],
    w_hh: [&Tensor; 2],
    mask: &Tensor,
) -> Result<Tensor> {
    let (t, b, four_h) = gates[0].dims3()?;
    let h = four_h / 4;
    let fits = t > 0
        && four_h == 4 * h
        && gates[1].dims() == gates[0].dims()
        && w_hh.iter().all(|w| w.dims() == [four_h, h])
        && mask.dims() == [b, t];
    if !fits {
        return Err(Error::Invalid(format!(
            "bilstm_final_states: gates {:?} and {:?}, w_hh {:?} and {:?}, mask {:?} do not fit",
            gates[0].dims(),
            gates[1].dims(),
            w_hh[0].dims(),
            w_hh[1].dims(),
            mask.dims()
        )));
    }
    same_float(
        "bilstm_final_states",
        &[gates[0], gates[1], w_hh[0], w_hh[1]],
    )?;
    let mask = mask.to_dtype(gates[0].dtype())?.contiguous()?;
    let (storage, layout) = mask.storage_and_layout();
    let mask = match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(m)) => {
            CpuStorage::F32(contiguous(m, layout, "bilstm mask")?.to_vec())
        }
        candle_core::Storage::Cpu(CpuStorage::F64(m)) => {
            CpuStorage::F64(contiguous(m, layout, "bilstm mask")?.to_vec())
        }
        _ => return Err(Error::Invalid("bilstm_final_states: a CPU mask".into())),
    };
    let op = BiLstm {
        mask,
        saved: OnceLock::new(),
    };
    let w = Tensor::cat(&w_hh, 0)?;
    Ok(gates[0]
        .contiguous()?
        .apply_op3(&gates[1].contiguous()?, &w, op)?)
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
