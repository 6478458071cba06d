//! Multi-head scaled dot-product attention on `[batch, tokens, heads * width]` tensors (what
//! the query, key and value layers give) without splitting them into heads: each head's
//! product reads its columns in place. candle's form copies q, k and v into `[batch, heads,
//! tokens, width]`, the keys once more transposed, scales and masks the scores in two more
//! passes and merges the heads back with another copy, each with its backward, and its batched
//! products and element-wise ops run on one thread; a transformer step spent a third of its
//! time there. Here three ops: the scaled scores ([`Kind::Scores`]), the masked softmax, and
//! the probabilities applied to the values ([`Kind::Apply`]), each one parallel pass over the
//! batch and heads.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{Threads, matmul_into};
use super::softmax::{SoftmaxGrad, softmax_row};
use super::{Float, contiguous, same_float};
use crate::{Error, Result};

/// What one [`HeadProduct`] computes per batch element and head `h` (`x_h`: the head's columns
/// of a token tensor `[batch, tokens, heads * width]`; `a_h`: its matrix of a score tensor
/// `[batch, heads, queries, keys]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `scale * x_h y_h^T`: two token tensors to a score tensor.
    Scores,
    /// `scale * a_h y_h`: a score tensor and a token tensor (over the keys) to a token tensor.
    Apply,
    /// `scale * a_h^T y_h`: a score tensor and a token tensor (over the queries) to a token
    /// tensor over the keys.
    ApplyTransposed,
}

/// A product per batch element and head (see [`Kind`]); its backward pass is two more.
#[derive(Clone, Copy, Debug)]
struct HeadProduct {
    kind: Kind,
    heads: usize,
    scale: f64,
}

/// `(batch, queries, keys, width)` of the operands, checked (`width` per head).
fn product_dims(
    kind: Kind,
    heads: usize,
    l: &Shape,
    r: &Shape,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let fail = || candle_core::bail!("attention ({kind:?}): {l:?} with {r:?} for {heads} heads");
    let (b, rt, w) = r.dims3()?;
    if heads == 0 || !w.is_multiple_of(heads) {
        return fail();
    }
    let d = w / heads;
    match kind {
        Kind::Scores => {
            let (lb, lt, lw) = l.dims3()?;
            if (lb, lw) != (b, w) {
                return fail();
            }
            Ok((b, lt, rt, d))
        }
        Kind::Apply | Kind::ApplyTransposed => {
            let (lb, lh, q, k) = l.dims4()?;
            let expected = if kind == Kind::Apply { k } else { q };
            if (lb, lh, expected) != (b, heads, rt) {
                return fail();
            }
            Ok((b, q, k, d))
        }
    }
}

impl HeadProduct {
    fn compute<T: Float>(
        &self,
        l: &[T],
        r: &[T],
        (b, q, k, d): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let (heads, w) = (self.heads, self.heads * d);
        let scale = T::from_f64(self.scale);
        let scaled = |out: &mut [T]| {
            if self.scale != 1.0 {
                out.iter_mut().for_each(|v| *v *= scale);
            }
        };
        match self.kind {
            Kind::Scores => {
                let mut out = vec![T::default(); b * heads * q * k];
                out.par_chunks_mut(q * k).enumerate().for_each(|(bh, s)| {
                    let (bi, h) = (bh / heads, bh % heads);
                    let x = &l[bi * q * w + h * d..];
                    let y = &r[bi * k * w + h * d..];
                    matmul_into((q, k, d), s, None, (x, w, 1), (y, 1, w), Threads::One);
                    scaled(s);
                });
                out
            }
            Kind::Apply | Kind::ApplyTransposed => {
                // Rows of the result per batch element, and of the token operand.
                let (rows, inner) = if self.kind == Kind::Apply {
                    (q, k)
                } else {
                    (k, q)
                };
                let mut out = vec![T::default(); b * rows * w];
                out.par_chunks_mut(rows * w)
                    .enumerate()
                    .for_each(|(bi, o)| {
                        let mut part = vec![T::default(); rows * d];
                        for h in 0..heads {
                            let a = &l[(bi * heads + h) * q * k..];
                            // a_h is `q x k` row-major; transposed, `k x q` with swapped strides.
                            let a = if self.kind == Kind::Apply {
                                (a, k, 1)
                            } else {
                                (a, 1, k)
                            };
                            let y = (&r[bi * inner * w + h * d..], w, 1);
                            matmul_into((rows, d, inner), &mut part, None, a, y, Threads::One);
                            scaled(&mut part);
                            for (dst, src) in o.chunks_mut(w).zip(part.chunks(d)) {
                                dst[h * d..(h + 1) * d].copy_from_slice(src);
                            }
                        }
                    });
                out
            }
        }
    }

    fn with(&self, kind: Kind) -> Self {
        Self { kind, ..*self }
    }
}

impl CustomOp2 for HeadProduct {
    fn name(&self) -> &'static str {
        "attention-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims @ (b, q, k, d) = product_dims(self.kind, self.heads, l1.shape(), l2.shape())?;
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |l, r| self
            .compute(l, r, dims));
        let w = self.heads * d;
        let shape = match self.kind {
            Kind::Scores => Shape::from((b, self.heads, q, k)),
            Kind::Apply => Shape::from((b, q, w)),
            Kind::ApplyTransposed => Shape::from((b, k, w)),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        l: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (dl, dr) = match self.kind {
            // out = s x y^T: dx = s g y, dy = s g^T x.
            Kind::Scores => (
                g.apply_op2_no_bwd(r, &self.with(Kind::Apply))?,
                g.apply_op2_no_bwd(l, &self.with(Kind::ApplyTransposed))?,
            ),
            // out = s a y: da = s g y^T, dy = s a^T g.
            Kind::Apply => (
                g.apply_op2_no_bwd(r, &self.with(Kind::Scores))?,
                l.apply_op2_no_bwd(&g, &self.with(Kind::ApplyTransposed))?,
            ),
            // out = s a^T y: da = s y g^T, dy = s a g.
            Kind::ApplyTransposed => (
                r.apply_op2_no_bwd(&g, &self.with(Kind::Scores))?,
                l.apply_op2_no_bwd(&g, &self.with(Kind::Apply))?,
            ),
        };
        Ok((Some(dl), Some(dr)))
    }
}

/// Softmax over the keys of scores `[batch, heads, queries, keys]` plus a bias per key
/// `[batch, keys]` (0 on tokens, a large negative number on padding). The bias is a mask and
/// gets no gradient.
struct MaskedSoftmax;

fn masked_softmax<T: Float>(s: &[T], bias: &[T], keys: usize, per_batch: usize) -> Vec<T> {
    let mut out = s.to_vec();
    out.par_chunks_mut(per_batch)
        .zip(bias.par_chunks(keys))
        .for_each(|(scores, bias)| {
            wide!({
                for row in scores.chunks_mut(keys) {
                    row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
                    softmax_row(row);
                }
            })
        });
    out
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "attention-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, heads, q, k) = l1.shape().dims4()?;
        if l2.shape().dims2()? != (b, k) || k == 0 {
            candle_core::bail!(
                "{}: bias {:?} for scores {:?}",
                self.name(),
                l2.shape(),
                l1.shape()
            );
        }
        let out = on_pair!(self.name(), (s1, l1), (s2, l2), |s, bias| masked_softmax(
            s,
            bias,
            k,
            heads * q * k
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad.contiguous()?.apply_op2_no_bwd(res, &SoftmaxGrad)?),
            None,
        ))
    }
}

/// Multi-head scaled dot-product attention (Vaswani et al. 2017) of `q` (`[batch, queries,
/// heads * width]`), `k` and `v` (`[batch, keys, heads * width]`) with `key_bias` (`[batch,
/// keys]`, added to every score of that key: 0 on tokens, a large negative number on padding).
/// Returns the context `[batch, queries, heads * width]` (the heads side by side, as the
/// output layer reads them) and the probabilities `[batch, heads, queries, keys]`.
/// `key_bias` is a mask: an error if it depends on a variable (it would get no gradient).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor)> {
    same_float("attention", &[q, k, v, key_bias])?;
    let (b, _, w) = q.dims3()?;
    let ok = heads > 0
        && w.is_multiple_of(heads)
        && k.dims3()? == (b, k.dim(1)?, w)
        && v.dims() == k.dims()
        && key_bias.dims2()? == (b, k.dim(1)?);
    if !ok {
        return Err(Error::Invalid(format!(
            "attention: q {:?}, k {:?}, v {:?}, key bias {:?} for {heads} heads",
            q.dims(),
            k.dims(),
            v.dims(),
            key_bias.dims()
        )));
    }
    if key_bias.track_op() {
        return Err(Error::Invalid(
            "attention: the key bias is a mask and gets no gradient, but it depends on a variable"
                .into(),
        ));
    }
    let scale = 1.0 / ((w / heads) as f64).sqrt();
    let product = |kind| HeadProduct { kind, heads, scale };
    let scores = q
        .contiguous()?
        .apply_op2(&k.contiguous()?, product(Kind::Scores))?;
    let probs = scores.apply_op2(&key_bias.contiguous()?, MaskedSoftmax)?;
    let context = probs.apply_op2(
        &v.contiguous()?,
        HeadProduct {
            scale: 1.0,
            ..product(Kind::Apply)
        },
    )?;
    Ok((context, probs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{assert_finite_differences, assert_same, seq};
    use candle_core::{D, DType};

    /// The composed candle form: heads split into `[batch, heads, tokens, width]`.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, w) = q.dims3()?;
        let keys = k.dim(1)?;
        let d = w / heads;
        let split = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (qh, kh, vh) = (split(q, t)?, split(k, keys)?, split(v, keys)?);
        let scores = (qh.matmul(&kh.transpose(2, 3)?.contiguous()?)? / (d as f64).sqrt())?
            .broadcast_add(&bias.unsqueeze(1)?.unsqueeze(1)?)?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let context = probs
            .matmul(&vh)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, w))?;
        Ok((context, probs))
    }

    /// A padding mask's bias: the last `pad[i]` keys of sentence `i` masked.
    fn bias(b: usize, keys: usize, dtype: DType) -> Result<Tensor> {
        let v: Vec<f64> = (0..b * keys)
            .map(|i| {
                if i % keys >= keys - i / keys % 3 {
                    -1e4
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, (b, keys), &candle_core::Device::Cpu)?.to_dtype(dtype)?)
    }

    #[test]
    fn attention_equals_the_composed_form_with_its_gradients() -> Result<()> {
        for (b, t, keys, heads, d) in [(2, 5, 5, 2, 3), (3, 4, 6, 3, 2), (1, 7, 7, 1, 4)] {
            let w = heads * d;
            let inputs = [
                seq(&[b, t, w], 1.3)?,
                seq(&[b, keys, w], 0.9)?,
                seq(&[b, keys, w], 1.1)?,
            ];
            let mask = bias(b, keys, DType::F64)?;
            let what = format!("attention b {b} t {t} keys {keys} heads {heads} d {d}");
            // The context from (q, k, v); the probabilities from (q, k) alone (their gradient
            // w.r.t. v is none).
            let ours = |x: &[Tensor]| -> Result<(Tensor, Tensor)> {
                let v = x.get(2).unwrap_or(&x[1]);
                attention(&x[0], &x[1], v, &bias(b, keys, DType::F64)?, heads)
            };
            let theirs = |x: &[Tensor]| -> Result<(Tensor, Tensor)> {
                let v = x.get(2).unwrap_or(&x[1]);
                composed(&x[0], &x[1], v, &bias(b, keys, DType::F64)?, heads)
            };
            assert_same(
                &|x: &[Tensor]| Ok(ours(x)?.0),
                &|x: &[Tensor]| Ok(theirs(x)?.0),
                &inputs,
                &format!("{what}: context"),
            )?;
            assert_same(
                &|x: &[Tensor]| Ok(ours(x)?.1),
                &|x: &[Tensor]| Ok(theirs(x)?.1),
                &inputs[..2],
                &format!("{what}: probabilities"),
            )?;
            let loss = |x: &[Tensor]| -> Result<Tensor> {
                let (c, p) = attention(&x[0], &x[1], &x[2], &mask, heads)?;
                Ok((c.sqr()?.sum_all()? + (p.sqr()?.sum_all()? * 0.5)?)?)
            };
            assert_finite_differences(&loss, &inputs, &what)?;
        }
        Ok(())
    }

    #[test]
    fn attention_in_f32_matches_f64_and_masks_padding() -> Result<()> {
        let (b, t, heads, d) = (3, 6, 2, 4);
        let x = [
            seq(&[b, t, heads * d], 1.0)?,
            seq(&[b, t, heads * d], 0.8)?,
            seq(&[b, t, heads * d], 1.2)?,
        ];
        let (c64, p64) = attention(&x[0], &x[1], &x[2], &bias(b, t, DType::F64)?, heads)?;
        let f32s: Vec<Tensor> = x
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let (c32, p32) = attention(
            &f32s[0],
            &f32s[1],
            &f32s[2],
            &bias(b, t, DType::F32)?,
            heads,
        )?;
        let diff = |a: &Tensor, b: &Tensor| {
            crate::testing::max_abs_difference(&a.to_dtype(DType::F64)?, b)
        };
        assert!(diff(&c32, &c64)? < 1e-5 && diff(&p32, &p64)? < 1e-5);
        // Sentence 1 pads its last key, sentence 2 its last two: no probability reaches them.
        let probs = p64.flatten_to(2)?.to_vec2::<f64>()?;
        for (row, values) in probs.iter().enumerate() {
            let sentence = row / (heads * t);
            let sum: f64 = values.iter().sum();
            assert!((sum - 1.0).abs() < 1e-12);
            for (key, p) in values.iter().enumerate() {
                if key >= t - sentence % 3 {
                    assert!(*p < 1e-12, "sentence {sentence} key {key}: {p}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_bias_that_depends_on_a_variable_is_refused() -> Result<()> {
        let x = candle_core::Var::from_tensor(&seq(&[1, 2, 2], 1.0)?)?;
        let bias = candle_core::Var::from_tensor(&Tensor::zeros(
            (1, 2),
            DType::F64,
            &candle_core::Device::Cpu,
        )?)?;
        let derived = (bias.as_tensor() * 2.0)?;
        assert!(attention(x.as_tensor(), x.as_tensor(), x.as_tensor(), &derived, 1).is_err());
        Ok(())
    }
}
