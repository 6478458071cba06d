//! A fully connected layer `y = x W^T + b` as one op: the bias is the product's starting value,
//! the backward pass returns the weight gradient in the weight's own layout, and the input
//! gradient is computed only when something upstream needs it. candle's composed form
//! (`matmul(W.t())` plus a bias) always computes the input gradient (a third of a first
//! layer's backward, for pixels nobody trains) and adds a transposed copy of every weight
//! gradient element by element.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::matmul::{Threads, matmul_into};
use super::{Real, contiguous, same_float};
use crate::{Error, Result};

/// `(x [rows, input], weight [output, input], bias [output])` -> `[rows, output]`.
#[derive(Clone, Copy)]
struct LinearOp;

/// `(rows, input, output)` of the operands, checked.
fn dims(x: &Shape, w: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (rows, input) = x.dims2()?;
    let (output, w_input) = w.dims2()?;
    if w_input != input {
        candle_core::bail!("linear: weight {w:?} does not fit input {x:?}");
    }
    Ok((rows, input, output))
}

fn forward<T: Real>(
    (rows, input, output): (usize, usize, usize),
    x: &[T],
    w: &[T],
    b: &[T],
) -> Vec<T> {
    let mut y = Vec::with_capacity(rows * output);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    matmul_into(
        (rows, output, input),
        &mut y,
        Some(T::ONE),
        (x, input, 1),
        (w, 1, input),
        Threads::Pool,
    );
    y
}

/// `[dweight, dbias, dx]` packed, `dx` only when `input_grad`.
fn backward<T: Real>(
    (rows, input, output): (usize, usize, usize),
    x: &[T],
    w: &[T],
    g: &[T],
    input_grad: bool,
) -> Vec<T> {
    let (nw, nx) = (output * input, if input_grad { rows * input } else { 0 });
    let mut out = vec![T::default(); nw + output + nx];
    let (dw, rest) = out.split_at_mut(nw);
    let (db, dx) = rest.split_at_mut(output);
    // dweight = g^T [output, rows] x x [rows, input]
    matmul_into(
        (output, input, rows),
        dw,
        None,
        (g, 1, output),
        (x, input, 1),
        Threads::Pool,
    );
    for row in g.chunks(output) {
        db.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
    }
    if input_grad {
        // dx = g [rows, output] x weight [output, input]
        matmul_into(
            (rows, input, output),
            dx,
            None,
            (g, output, 1),
            (w, input, 1),
            Threads::Pool,
        );
    }
    out
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        let d = dims(l1.shape(), l2.shape())?;
        if l3.shape().elem_count() != d.2 {
            candle_core::bail!("linear: bias {:?} for {} outputs", l3.shape(), d.2);
        }
        let out = on_slices!(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| forward(d, x, w, b)
        );
        Ok((out, Shape::from((d.0, d.2))))
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
        let packed = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &LinearGrad { input_grad })?;
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
            Some(packed.narrow(0, nw, nb)?.reshape(bias.shape())?),
        ))
    }
}

/// The backward pass of [`LinearOp`] on `(x, weight, dy)`: `dweight`, `dbias` and (when the
/// input needs it) `dx`, packed into one vector.
struct LinearGrad {
    input_grad: bool,
}

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "linear-backward"
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
        let d = dims(l1.shape(), l2.shape())?;
        if l3.shape().dims() != [d.0, d.2] {
            candle_core::bail!("linear-backward: gradient {:?} does not fit", l3.shape());
        }
        let out = on_slices!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, w, g| {
            backward(d, x, w, g, self.input_grad)
        });
        let len = d.2 * d.1 + d.2 + if self.input_grad { d.0 * d.1 } else { 0 };
        Ok((out, Shape::from(len)))
    }
}

/// `x W^T + b` for `x` `[rows, input]`, `weight` `[output, input]`, `bias` `[output]` (f32 or
/// f64): the same values and gradients as `x.matmul(&weight.t())` plus a broadcast bias, with
/// the input gradient skipped when `x` needs none.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, input) = x.dims2()?;
    let (output, w_input) = weight.dims2()?;
    if w_input != input || bias.elem_count() != output {
        return Err(Error::Invalid(format!(
            "linear: weight {:?} and bias {:?} do not fit input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        )));
    }
    same_float("linear", &[x, weight, bias])?;
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.flatten_all()?.contiguous()?,
        LinearOp,
    )?)
}
