//! The f32 products on a CBLAS library equal the gemm crate's, for every way `kernels::matmul`
//! splits a product: column bands, row bands, one band, transposed operands. The library is the
//! one workers install by default (`install_matrix_products`: the project's OpenBLAS from the
//! data cache, fetched on first use; `DISTILL_CBLAS` where the user names another). In its own
//! binary: installing a CBLAS library is for the whole process.

use distill_host::{
    CBLAS_ENV, CblasError, OPENBLAS, Products, install_matrix_products, load_cblas,
};
use distill_rt::candle::{DType, Tensor, Var};
use distill_rt::kernels::{cblas_sgemm_installed, conv2d, linear};
use distill_rt::testing::max_relative_error;
use distill_tests::{fixed_tensor, plugin_path};

/// Values and the gradients of every input of a fixed weighting, for the given computation.
fn run(
    f: &dyn Fn(&[Tensor]) -> distill_rt::Result<Tensor>,
    inputs: &[Tensor],
) -> Result<Vec<Tensor>, Box<dyn std::error::Error>> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>, _>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors)?;
    let w = fixed_tensor(y.elem_count(), 1, 9, 1.0, DType::F32).reshape(y.shape())?;
    let grads = (&y * &w)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for v in &vars {
        out.push(
            grads
                .get(v.as_tensor())
                .ok_or("an input has no gradient")?
                .clone(),
        );
    }
    Ok(out)
}

/// The largest difference relative to the largest magnitude of `want`: two f32 products that
/// sum hundreds of terms in different orders differ by rounding relative to the sums' scale.
fn difference(got: &Tensor, want: &Tensor) -> distill_rt::Result<f64> {
    let scale = want
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    max_relative_error(got, want, scale.max(1e-12))
}

#[test]
fn products_on_cblas_equal_the_gemm_crate() -> Result<(), Box<dyn std::error::Error>> {
    let t = |r, c, seed| fixed_tensor(r, c, seed, 1.0, DType::F32);
    // (rows, input, output): column bands, row bands (narrow), one band (few rows), wide input.
    let layers = [(128, 64, 300), (300, 32, 16), (8, 40, 12), (64, 784, 256)];
    let cases: Vec<(String, Vec<Tensor>)> = layers
        .iter()
        .map(|&(rows, input, output)| {
            let inputs = vec![
                t(rows, input, 1),
                t(output, input, 2),
                t(1, output, 3).flatten_all()?,
            ];
            Ok((format!("linear {rows}x{input} -> {output}"), inputs))
        })
        .collect::<distill_rt::Result<_>>()?;
    let conv_inputs = vec![
        t(2 * 3, 64, 4).reshape((2, 3, 8, 8))?,
        t(5, 27, 5).reshape((5, 3, 3, 3))?,
        t(1, 5, 6).flatten_all()?,
    ];
    let lin = |x: &[Tensor]| linear(&x[0], &x[1], &x[2]);
    let conv = |x: &[Tensor]| conv2d(&x[0], &x[1], &x[2], 1, 1);
    let mut reference = Vec::new();
    for (_, inputs) in &cases {
        reference.push(run(&lin, inputs)?);
    }
    let conv_reference = run(&conv, &conv_inputs)?;

    assert!(!cblas_sgemm_installed());
    let Products::Cblas { path, core } = install_matrix_products()? else {
        panic!("the matrix products are not on a CBLAS library (the log says why)");
    };
    if std::env::var_os(CBLAS_ENV).is_none() {
        // The project's OpenBLAS, from the data cache, with the kernels it chose for this CPU.
        let folder = distill_host::data_folder(OPENBLAS)?;
        assert_eq!(path.parent(), Some(folder.as_path()));
        assert!(core.is_some(), "OpenBLAS did not name its kernels");
    }
    assert!(cblas_sgemm_installed());
    for ((what, inputs), want) in cases.iter().zip(&reference) {
        for (got, want) in run(&lin, inputs)?.iter().zip(want) {
            let err = difference(got, want)?;
            assert!(err < 1e-5, "{what}: relative difference {err}");
        }
    }
    for (got, want) in run(&conv, &conv_inputs)?.iter().zip(&conv_reference) {
        let err = difference(got, want)?;
        assert!(err < 1e-5, "conv2d: relative difference {err}");
    }

    // A second library does not replace the first; what is not a CBLAS library is refused.
    assert_eq!(load_cblas(&path)?, None);
    let not_cblas = plugin_path("distill_plugin_vision");
    assert!(matches!(
        load_cblas(&not_cblas),
        Err(CblasError::NoSgemm { .. })
    ));
    let missing = std::env::temp_dir().join("no-such-cblas.so");
    let err = load_cblas(&missing).err().ok_or("a missing file loaded")?;
    assert!(matches!(err, CblasError::Open { .. }));
    assert!(err.to_string().contains("DISTILL_CBLAS"));
    Ok(())
}
