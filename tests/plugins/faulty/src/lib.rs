//! Test plugin for fault containment and observability: the strategy `test.panic` panics in
//! `loss`, `test.panic-build` panics while being built, `test.abort` aborts the process,
//! `test.traced` emits a tracing event from inside the plugin and computes a plain
//! cross-entropy; `test.nan` computes cross-entropy at optimizer step 0 and NaN from then on;
//! `test.wait` computes cross-entropy after waiting, at its first step, while the file named by
//! the environment variable `TEST_WAIT_WHILE_EXISTS` exists (a job a test can hold running and
//! then release, with the same job identity); the model `test.panic-model` panics in `forward`.

use distill_rt::strategy::StepInfo;
use distill_rt::{
    Batch, Config, LossTerms, Model, ModelContext, ModelFactory, ModelOutput, Registrar, Result,
    Strategy, StrategyContext, StrategyFactory, TeacherNeeds, TensorMap, ops, tracing,
};

distill_rt::export_plugin!(register);

fn register(r: &mut Registrar) -> Result<()> {
    r.strategy(
        "test.panic",
        Faulty {
            panic_in_build: false,
        },
    )?;
    r.strategy(
        "test.panic-build",
        Faulty {
            panic_in_build: true,
        },
    )?;
    r.strategy("test.abort", Aborting)?;
    r.strategy("test.traced", Traced)?;
    r.strategy("test.nan", NanFromStep1)?;
    r.strategy("test.wait", Waiting)?;
    r.model("test.panic-model", PanickingModelFactory)?;
    Ok(())
}

struct PanickingModelFactory;

impl ModelFactory for PanickingModelFactory {
    fn summary(&self) -> &str {
        "test model whose forward panics"
    }
    fn build(&self, _c: &Config, _ctx: ModelContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(PanickingModel))
    }
}

struct PanickingModel;

impl Model for PanickingModel {
    fn forward(&self, _inputs: &TensorMap, _train: bool) -> Result<ModelOutput> {
        panic!("test.panic-model: deliberate panic in forward");
    }
    fn flops_per_sample(&self) -> u64 {
        0
    }
}

struct Faulty {
    panic_in_build: bool,
}

impl StrategyFactory for Faulty {
    fn summary(&self) -> &str {
        "test strategy that panics"
    }
    fn build(&self, _c: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        if self.panic_in_build {
            panic!("test.panic-build: deliberate panic in build");
        }
        Ok(Box::new(Panicking))
    }
}

struct Panicking;

impl Strategy for Panicking {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::default()
    }
    fn loss(
        &self,
        _s: &ModelOutput,
        _t: Option<&ModelOutput>,
        _b: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        panic!("test.panic: deliberate panic in loss at step {}", step.step);
    }
}

struct Aborting;

impl StrategyFactory for Aborting {
    fn summary(&self) -> &str {
        "test strategy that aborts the process in loss (a crash no catch_unwind can contain)"
    }
    fn build(&self, _c: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        Ok(Box::new(AbortingStrategy))
    }
}

struct AbortingStrategy;

impl Strategy for AbortingStrategy {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::default()
    }
    fn loss(
        &self,
        _s: &ModelOutput,
        _t: Option<&ModelOutput>,
        _b: &Batch,
        _step: &StepInfo,
    ) -> Result<LossTerms> {
        std::process::abort();
    }
}

struct Traced;

impl StrategyFactory for Traced {
    fn summary(&self) -> &str {
        "test strategy that logs a tracing event from inside the plugin"
    }
    fn build(&self, _c: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        Ok(Box::new(TracedStrategy))
    }
}

struct TracedStrategy;

impl Strategy for TracedStrategy {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::default()
    }
    fn loss(
        &self,
        s: &ModelOutput,
        _t: Option<&ModelOutput>,
        b: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        tracing::info!(target: "distill_test_faulty", step = step.step, "loss computed inside the plugin");
        let ce = ops::cross_entropy(&s.logits, &b.targets)?;
        LossTerms::sum([("ce", ce)])
    }
}

struct NanFromStep1;

impl StrategyFactory for NanFromStep1 {
    fn summary(&self) -> &str {
        "test strategy whose loss is NaN from optimizer step 1 on"
    }
    fn build(&self, _c: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        Ok(Box::new(NanFromStep1))
    }
}

impl Strategy for NanFromStep1 {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::default()
    }
    fn loss(
        &self,
        s: &ModelOutput,
        _t: Option<&ModelOutput>,
        b: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        let ce = ops::cross_entropy(&s.logits, &b.targets)?;
        let ce = if step.step >= 1 { (ce * f64::NAN)? } else { ce };
        LossTerms::sum([("ce", ce)])
    }
}

struct Waiting;

impl StrategyFactory for Waiting {
    fn summary(&self) -> &str {
        "test strategy that waits while the file named by TEST_WAIT_WHILE_EXISTS exists, then computes cross-entropy"
    }
    fn build(&self, _c: &Config, _ctx: StrategyContext<'_>) -> Result<Box<dyn Strategy>> {
        Ok(Box::new(Waiting))
    }
}

impl Strategy for Waiting {
    fn teacher_needs(&self) -> TeacherNeeds {
        TeacherNeeds::default()
    }
    fn loss(
        &self,
        s: &ModelOutput,
        _t: Option<&ModelOutput>,
        b: &Batch,
        step: &StepInfo,
    ) -> Result<LossTerms> {
        if step.step == 0
            && let Some(path) = std::env::var_os("TEST_WAIT_WHILE_EXISTS")
        {
            while std::path::Path::new(&path).exists() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let ce = ops::cross_entropy(&s.logits, &b.targets)?;
        LossTerms::sum([("ce", ce)])
    }
}
