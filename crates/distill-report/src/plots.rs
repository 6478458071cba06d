//! Plots of a report, each as PNG and SVG (plotters): learning curves (the validation primary
//! metric per epoch, the mean over seeds with a min-max band, a line per strategy), loss terms
//! per epoch (a panel per strategy, a line per term), and the primary metric against the
//! parameter count (teachers and students, the Pareto front marked).
//!
//! Text is set in DejaVu Sans, embedded from the `dejavu` crate (no system font needed);
//! `DISTILL_FONT` names another TrueType file instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use distill_engine::job::{JobRecord, Status};
use distill_engine::train;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::register_font;

use crate::{ReportError, Result, cells};

/// The font family the plots ask for; the font found is registered under it.
const FAMILY: &str = "sans-serif";

/// Registers the plots' font once per process: `DISTILL_FONT` if set, else the embedded DejaVu
/// Sans. The error names the file that could not be used.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), (PathBuf, String)>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes: &'static [u8] = match std::env::var_os("DISTILL_FONT") {
            Some(path) => {
                let path = PathBuf::from(path);
                let bytes = std::fs::read(&path)
                    .map_err(|e| (path.clone(), format!("DISTILL_FONT: {e}")))?;
                // plotters keeps fonts for the whole process.
                Box::leak(bytes.into_boxed_slice())
            }
            None => dejavu::sans::regular(),
        };
        register_font(FAMILY, FontStyle::Normal, bytes).map_err(|_| {
            let path = std::env::var_os("DISTILL_FONT")
                .map_or_else(|| PathBuf::from("(embedded DejaVu Sans)"), PathBuf::from);
            (path, "not a TrueType font".to_string())
        })
    })
    .clone()
    .map_err(|(path, message)| ReportError::Plot { path, message })
}

/// Line colours: matplotlib's "tab10", then ten darker ones (plotters' `Palette99` starts with
/// pale colours that vanish on white).
const COLORS: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 128),
    (128, 0, 0),
    (0, 128, 128),
    (128, 128, 0),
    (70, 70, 70),
    (200, 0, 200),
    (0, 100, 0),
    (139, 69, 19),
    (72, 61, 139),
    (255, 20, 147),
];

/// The `i`-th line colour (cycling).
fn color(i: usize) -> RGBColor {
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b)
}

/// An epoch axis label: epochs are whole numbers.
fn epoch_label(x: &f64) -> String {
    format!("{}", x.round() as i64)
}

/// A parameter count as `5.2k`, `1.3M`.
fn count_label(x: &f64) -> String {
    // Up to three significant digits, without trailing zeros.
    let short = |v: f64| {
        let digits = if v >= 100.0 {
            0
        } else if v >= 10.0 {
            1
        } else {
            2
        };
        let text = format!("{v:.digits$}");
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        }
    };
    match *x {
        x if x >= 1e6 => format!("{}M", short(x / 1e6)),
        x if x >= 1e3 => format!("{}k", short(x / 1e3)),
        x => short(x),
    }
}

/// `name` cut to `max` characters with an ellipsis (panel captions).
fn shortened(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_string()
    } else {
        format!("{}…", name.chars().take(max - 1).collect::<String>())
    }
}

/// A picture that can be drawn on any plotters backend.
trait Figure {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws the figure on `area`.
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult;
}

/// What drawing returns: plotters' errors as text (they are generic over the backend).
type DrawResult = std::result::Result<(), String>;

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// One plot written as `<stem>.png` and `<stem>.svg`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plot {
    /// What it shows (the Markdown image's title).
    pub title: String,
    /// The PNG file.
    pub png: PathBuf,
    /// The SVG file.
    pub svg: PathBuf,
}

/// Draws `figure` into `<stem>.svg` and `<stem>.png`.
fn save(figure: &impl Figure, stem: &Path, title: &str) -> Result<Plot> {
    let failed = |path: &Path, message: String| ReportError::Plot {
        path: path.to_path_buf(),
        message,
    };
    let (w, h) = figure.size();
    let svg_path = stem.with_extension("svg");
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        figure
            .draw(&area)
            .and_then(|()| area.present().map_err(text))
            .map_err(|m| failed(&svg_path, m))?;
    }
    std::fs::write(&svg_path, svg).map_err(|source| ReportError::Io {
        path: svg_path.clone(),
        source,
    })?;
    let png_path = stem.with_extension("png");
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let area = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        figure
            .draw(&area)
            .and_then(|()| area.present().map_err(text))
            .map_err(|m| failed(&png_path, m))?;
    }
    let file = std::fs::File::create(&png_path).map_err(|source| ReportError::Io {
        path: png_path.clone(),
        source,
    })?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&rgb))
        .map_err(|e| failed(&png_path, e.to_string()))?;
    Ok(Plot {
        title: title.to_string(),
        png: png_path,
        svg: svg_path,
    })
}

/// Mean, min and max of one epoch over the seeds that reached it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Band {
    epoch: usize,
    mean: f64,
    min: f64,
    max: f64,
}

/// Per epoch, mean / min / max over `runs` of the value `pick` finds (epochs some run lacks use
/// the runs that have them).
fn bands(
    runs: &[&JobRecord],
    pick: impl Fn(&distill_engine::train::EpochRecord) -> Option<f64>,
) -> Vec<Band> {
    let mut by_epoch: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.status != Status::Failed) {
        for e in &r.epochs {
            if let Some(v) = pick(e).filter(|v| v.is_finite()) {
                by_epoch.entry(e.epoch).or_default().push(v);
            }
        }
    }
    by_epoch
        .into_iter()
        .map(|(epoch, v)| Band {
            epoch,
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
        .collect()
}

/// `lo..hi` widened by 5% on each side (and to a unit width around a single value).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - 0.05 * span)..(hi + 0.05 * span)
}

/// A named line: per-epoch bands of one strategy or one loss term.
type Line = (String, Vec<Band>);

/// Dataset, teacher (empty without one) and student: what one curves / losses plot covers.
type Group = (String, String, String);

/// A chart with epochs across and linear values up.
type EpochChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws the per-epoch means of `bands` as a line of `color`, with a legend entry `name`.
fn mean_line<'a, DB: DrawingBackend + 'a>(
    chart: &mut EpochChart<'a, DB>,
    bands: &[Band],
    name: &str,
    color: RGBColor,
) -> DrawResult {
    chart
        .draw_series(LineSeries::new(
            bands.iter().map(|b| (b.epoch as f64 + 1.0, b.mean)),
            color.stroke_width(2),
        ))
        .map_err(text)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    Ok(())
}

/// The legend box of `chart`: the labels of its series in `size` points at `position`.
fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    size: u32,
    position: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .label_font((FAMILY, size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(text)
}

/// Learning curves of one dataset / teacher / student group.
struct Curves {
    title: String,
    metric: String,
    /// Per strategy, the validation metric.
    lines: Vec<Line>,
}

impl Figure for Curves {
    fn size(&self) -> (u32, u32) {
        (1000, 640)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult {
        area.fill(&WHITE).map_err(text)?;
        let all = self.lines.iter().flat_map(|(_, b)| b);
        let epochs = all.clone().map(|b| b.epoch + 1).max().unwrap_or(1);
        let lo = all.clone().map(|b| b.min).fold(f64::INFINITY, f64::min);
        let hi = all.map(|b| b.max).fold(f64::NEG_INFINITY, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.5f64..epochs as f64 + 0.5, padded(lo, hi))
            .map_err(text)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_labels(epochs.min(20))
            .x_label_formatter(&epoch_label)
            .x_desc("epoch")
            .y_desc(format!("validation {}", self.metric))
            .draw()
            .map_err(text)?;
        for (i, (name, bands)) in self.lines.iter().enumerate() {
            let color = color(i);
            let x = |b: &Band| b.epoch as f64 + 1.0;
            let mut outline: Vec<(f64, f64)> = bands.iter().map(|b| (x(b), b.max)).collect();
            outline.extend(bands.iter().rev().map(|b| (x(b), b.min)));
            chart
                .draw_series(std::iter::once(Polygon::new(
                    outline,
                    color.mix(0.15).filled(),
                )))
                .map_err(text)?;
            mean_line(&mut chart, bands, name, color)?;
        }
        legend(&mut chart, 12, SeriesLabelPosition::LowerRight)
    }
}

/// Loss terms per epoch: a panel per strategy, a line per term (mean over seeds).
struct Losses {
    title: String,
    /// Per strategy, a line per loss term.
    panels: Vec<(String, Vec<Line>)>,
}

impl Losses {
    fn grid(&self) -> (usize, usize) {
        let n = self.panels.len().max(1);
        let cols = (n as f64).sqrt().ceil() as usize;
        (n.div_ceil(cols), cols)
    }
}

impl Figure for Losses {
    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        (cols as u32 * 380, rows as u32 * 280 + 40)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult {
        area.fill(&WHITE).map_err(text)?;
        let area = area.titled(&self.title, (FAMILY, 20)).map_err(text)?;
        let panels = area.split_evenly(self.grid());
        // One colour per term name across panels.
        let mut terms: Vec<&str> = self
            .panels
            .iter()
            .flat_map(|(_, t)| t.iter().map(|(name, _)| name.as_str()))
            .collect();
        terms.sort_unstable();
        terms.dedup();
        for ((strategy, lines), panel) in self.panels.iter().zip(&panels) {
            let all = lines.iter().flat_map(|(_, b)| b);
            let epochs = all.clone().map(|b| b.epoch + 1).max().unwrap_or(1);
            let lo = all.clone().map(|b| b.mean).fold(f64::INFINITY, f64::min);
            let hi = all.map(|b| b.mean).fold(f64::NEG_INFINITY, f64::max);
            let mut chart = ChartBuilder::on(panel)
                .caption(shortened(strategy, 48), (FAMILY, 13))
                .margin(6)
                .x_label_area_size(24)
                .y_label_area_size(48)
                .build_cartesian_2d(0.5f64..epochs as f64 + 0.5, padded(lo.min(0.0), hi))
                .map_err(text)?;
            chart
                .configure_mesh()
                .max_light_lines(0)
                .x_labels(epochs.min(10))
                .x_label_formatter(&epoch_label)
                .label_style((FAMILY, 10))
                .x_desc("epoch")
                .draw()
                .map_err(text)?;
            for (term, bands) in lines {
                // The total in black, each other term in its colour in every panel.
                let color = match terms.iter().position(|t| t == term) {
                    _ if term == "total" => BLACK,
                    Some(i) => color(i),
                    None => color(0),
                };
                mean_line(&mut chart, bands, term, color)?;
            }
            legend(&mut chart, 10, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    }
}

/// One model on the metric-vs-size plot.
#[derive(Clone, Debug, PartialEq)]
struct Point {
    label: String,
    parameters: f64,
    metric: f64,
    teacher: bool,
}

/// The points no other point beats with as many or fewer parameters, by size.
fn pareto_front(points: &[Point]) -> Vec<&Point> {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| {
        a.parameters
            .total_cmp(&b.parameters)
            .then(b.metric.total_cmp(&a.metric))
    });
    let mut front: Vec<&Point> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|best| p.metric > best.metric) {
            front.push(p);
        }
    }
    front
}

/// The primary metric against parameters (log scale) for one dataset.
struct Pareto {
    title: String,
    metric: String,
    points: Vec<Point>,
}

impl Figure for Pareto {
    fn size(&self) -> (u32, u32) {
        (1000, 640)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult {
        area.fill(&WHITE).map_err(text)?;
        let xs = self.points.iter().map(|p| p.parameters);
        let (xlo, xhi) = (
            xs.clone().fold(f64::INFINITY, f64::min).max(1.0),
            xs.fold(1.0, f64::max),
        );
        let ys = self.points.iter().map(|p| p.metric);
        let (ylo, yhi) = (
            ys.clone().fold(f64::INFINITY, f64::min),
            ys.fold(f64::NEG_INFINITY, f64::max),
        );
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d((xlo / 1.5..xhi * 1.5).log_scale(), padded(ylo, yhi))
            .map_err(text)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_labels(6)
            .x_label_formatter(&count_label)
            .x_desc("parameters (log scale)")
            .y_desc(format!("test {}", self.metric))
            .draw()
            .map_err(text)?;
        let front_color = color(3);
        for (teachers, color, label) in [
            (false, color(0), "students (mean over seeds)"),
            (true, color(1), "teachers"),
        ] {
            chart
                .draw_series(
                    self.points
                        .iter()
                        .filter(|p| p.teacher == teachers)
                        .map(|p| Circle::new((p.parameters, p.metric), 4, color.filled())),
                )
                .map_err(text)?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        }
        let front = pareto_front(&self.points);
        chart
            .draw_series(LineSeries::new(
                front.iter().map(|p| (p.parameters, p.metric)),
                front_color.stroke_width(2),
            ))
            .map_err(text)?
            .label("Pareto front")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], front_color.stroke_width(2))
            });
        chart
            .draw_series(front.iter().map(|p| {
                EmptyElement::at((p.parameters, p.metric))
                    + Circle::new((0, 0), 7, front_color.stroke_width(2))
                    + Text::new(p.label.clone(), (9, -14), (FAMILY, 12))
            }))
            .map_err(text)?;
        legend(&mut chart, 12, SeriesLabelPosition::LowerRight)
    }
}

/// A file-name part made of `name`: lowercase letters, digits and single dashes.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Writes every plot of `records` into `dir` (created if missing) and returns them in the order
/// a report shows them: per dataset / teacher / student group its learning curves and loss
/// terms, then per dataset the metric against size. `metric` names the primary metric.
pub fn write_plots(dir: &Path, records: &[JobRecord], metric: &str) -> Result<Vec<Plot>> {
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut groups: BTreeMap<Group, Vec<(String, Vec<&JobRecord>)>> = BTreeMap::new();
    for ((dataset, teacher, student, strategy), runs) in cells(records) {
        groups
            .entry((dataset, teacher, student))
            .or_default()
            .push((strategy, runs));
    }
    let mut plots = Vec::new();
    for ((dataset, teacher, student), cells) in &groups {
        let teacher_text = if teacher.is_empty() { "none" } else { teacher };
        let group = format!("{dataset} · teacher {teacher_text} · student {student}");
        let name = slug(&format!("{dataset} {teacher_text} {student}"));
        let curves = Curves {
            title: format!("{group}: validation {metric}"),
            metric: metric.to_string(),
            lines: cells
                .iter()
                .map(|(strategy, runs)| {
                    (
                        strategy.clone(),
                        bands(runs, |e| train::metric(&e.validation, metric)),
                    )
                })
                .collect(),
        };
        plots.push(save(
            &curves,
            &dir.join(format!("curves-{name}")),
            &curves.title,
        )?);
        let losses = Losses {
            title: format!("{group}: training loss terms"),
            panels: cells
                .iter()
                .map(|(strategy, runs)| {
                    let mut names: Vec<&str> = runs
                        .iter()
                        .flat_map(|r| r.epochs.iter())
                        .flat_map(|e| e.train.iter().map(|(k, _)| k.as_str()))
                        .collect();
                    names.sort_unstable();
                    names.dedup();
                    let lines = names
                        .into_iter()
                        .map(|term| {
                            (
                                term.to_string(),
                                bands(runs, |e| train::metric(&e.train, term)),
                            )
                        })
                        .collect();
                    (strategy.clone(), lines)
                })
                .collect(),
        };
        plots.push(save(
            &losses,
            &dir.join(format!("losses-{name}")),
            &losses.title,
        )?);
    }
    let datasets: Vec<&String> = {
        let mut d: Vec<&String> = groups.keys().map(|(d, _, _)| d).collect();
        d.dedup();
        d
    };
    for dataset in datasets {
        let mut points: Vec<Point> = records
            .iter()
            .filter(|r| r.kind == "teacher" && &r.dataset == dataset && r.status == Status::Ok)
            .filter_map(|r| {
                r.best_metric.map(|m| Point {
                    label: format!("teacher {}", r.model),
                    parameters: r.parameters as f64,
                    metric: m,
                    teacher: true,
                })
            })
            .collect();
        let students = groups
            .iter()
            .filter(|((d, _, _), _)| d == dataset)
            .flat_map(|((_, _, student), cells)| cells.iter().map(move |c| (student, c)));
        for (student, (strategy, runs)) in students {
            let ok: Vec<&&JobRecord> = runs.iter().filter(|r| r.status == Status::Ok).collect();
            let values: Vec<f64> = ok.iter().filter_map(|r| r.best_metric).collect();
            if values.is_empty() {
                continue;
            }
            points.push(Point {
                label: format!("{student} {strategy}"),
                parameters: ok.iter().map(|r| r.parameters as f64).sum::<f64>() / ok.len() as f64,
                metric: values.iter().sum::<f64>() / values.len() as f64,
                teacher: false,
            });
        }
        // Nothing finished with a metric (every run failed): no axes to draw.
        if points.is_empty() {
            continue;
        }
        let pareto = Pareto {
            title: format!("{dataset}: test {metric} against parameters"),
            metric: metric.to_string(),
            points,
        };
        plots.push(save(
            &pareto,
            &dir.join(format!("pareto-{}", slug(dataset))),
            &pareto.title,
        )?);
    }
    Ok(plots)
}

/// Markdown that shows `plots` (SVG, with the PNG linked), paths relative to `base`.
pub fn plots_markdown(plots: &[Plot], base: &Path) -> String {
    let rel = |p: &Path| {
        p.strip_prefix(base)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    let mut out = String::from("\n## Plots\n");
    for p in plots {
        out.push_str(&format!(
            "\n### {}\n\n![{}]({}) ([PNG]({}))\n",
            p.title,
            p.title,
            rel(&p.svg),
            rel(&p.png)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_engine::job::{Component, Job, JobSpec, empty_record};
    use distill_engine::train::{EpochRecord, TrainConfig};

    /// A finished student run of `strategy` whose validation accuracy per epoch is `curve`.
    fn run(id: &str, strategy: &str, seed: u64, curve: &[f64]) -> JobRecord {
        let component = |name: &str| Component {
            name: name.into(),
            config: serde_json::Value::Null,
        };
        let spec = JobSpec {
            id: id.into(),
            spec_id: None,
            code: None,
            experiment: "exp".into(),
            out_dir: PathBuf::from("/nonexistent"),
            job: Job::Student {
                dataset: component("d"),
                model: component("s"),
                strategy: component(strategy),
                teachers: Vec::new(),
                train: TrainConfig::default(),
                seed,
                generation: None,
            },
        };
        let mut r = empty_record(&spec);
        r.status = Status::Ok;
        r.parameters = 100;
        r.best_metric = curve.last().copied();
        r.epochs = curve
            .iter()
            .enumerate()
            .map(|(epoch, v)| EpochRecord {
                epoch,
                lr: 0.1,
                train: vec![("total".into(), 2.0 - v), ("ce".into(), 1.0 - v)],
                validation: vec![("accuracy".into(), *v)],
                test: vec![("accuracy".into(), *v)],
            })
            .collect();
        r
    }

    fn records(kd_last: f64) -> Vec<JobRecord> {
        let mut teacher = run("t", "unused", 0, &[0.95]);
        teacher.kind = "teacher".into();
        teacher.strategy = None;
        teacher.parameters = 10_000;
        vec![
            run("b0", "baseline", 0, &[0.3, 0.5, 0.6]),
            run("b1", "baseline", 1, &[0.2, 0.45, 0.62]),
            run("k0", "kd", 0, &[0.35, 0.6, kd_last]),
            run("k1", "kd", 1, &[0.3, 0.55, kd_last - 0.02]),
            teacher,
        ]
    }

    fn pixels_of(png_path: &Path, rgb: (u8, u8, u8)) -> usize {
        let file = std::fs::File::open(png_path).unwrap_or_else(|e| panic!("{e}"));
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap_or_else(|e| panic!("{}: not a PNG: {e}", png_path.display()));
        let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
        let info = reader
            .next_frame(&mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf[..info.buffer_size()]
            .chunks(3)
            .filter(|p| (p[0], p[1], p[2]) == rgb)
            .count()
    }

    #[test]
    fn bands_are_mean_min_max_over_seeds() {
        let rs = records(0.7);
        let kd: Vec<&JobRecord> = rs.iter().filter(|r| r.id.starts_with('k')).collect();
        let b = bands(&kd, |e| train::metric(&e.validation, "accuracy"));
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].min, b[0].max), (0.3, 0.35));
        assert!((b[0].mean - 0.325).abs() < 1e-12 && (b[2].mean - 0.69).abs() < 1e-12);
    }

    #[test]
    fn the_pareto_front_keeps_what_nothing_smaller_beats() {
        let p = |label: &str, parameters: f64, metric: f64| Point {
            label: label.into(),
            parameters,
            metric,
            teacher: false,
        };
        let points = [
            p("a", 100.0, 0.7),
            p("b", 100.0, 0.8),
            p("c", 50.0, 0.6),
            p("d", 1000.0, 0.75),
            p("e", 5000.0, 0.9),
        ];
        let front: Vec<&str> = pareto_front(&points)
            .iter()
            .map(|p| p.label.as_str())
            .collect();
        assert_eq!(front, ["c", "b", "e"]);
    }

    /// A grid in which nothing finished with a metric (a diverged teacher, its students
    /// skipped) draws no Pareto plot instead of an axis from infinity (where plotters' log
    /// scale never ends its ticks).
    #[test]
    fn a_grid_without_any_metric_has_no_pareto_plot() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("distill-plots-none-{}", std::process::id()));
        let mut failed = records(0.7);
        for r in &mut failed {
            r.status = Status::Failed;
            r.best_metric = None;
            r.epochs.clear();
        }
        let plots = write_plots(&dir, &failed, "accuracy")?;
        assert!(
            plots
                .iter()
                .all(|p| !p.svg.to_string_lossy().contains("pareto")),
            "{plots:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn plots_are_valid_files_that_show_the_data_and_follow_it() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("distill-plots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plots = write_plots(&dir.join("a"), &records(0.7), "accuracy")?;
        let names: Vec<String> = plots
            .iter()
            .map(|p| {
                p.svg
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            names,
            ["curves-d-none-s.svg", "losses-d-none-s.svg", "pareto-d.svg"]
        );
        let line = color(0); // the first strategy's line: baseline
        let hex = format!("#{:02X}{:02X}{:02X}", line.0, line.1, line.2);
        for p in &plots {
            let svg = std::fs::read_to_string(&p.svg).map_err(|source| ReportError::Io {
                path: p.svg.clone(),
                source,
            })?;
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            let bytes = std::fs::read(&p.png).map_err(|source| ReportError::Io {
                path: p.png.clone(),
                source,
            })?;
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
        // The learning curves: one mean line per strategy (3 epochs -> 3 points) plus its legend
        // sample, a min-max band per strategy, and the line's colour in the PNG.
        let curves = std::fs::read_to_string(&plots[0].svg).unwrap_or_default();
        let lines: Vec<&str> = curves
            .split("<polyline")
            .skip(1)
            .filter(|l| l.contains(&format!("stroke=\"{hex}\"")))
            .collect();
        assert!(
            lines.iter().any(|l| l
                .split("points=\"")
                .nth(1)
                .is_some_and(|p| p.split_whitespace().count() >= 3)),
            "no 3-point baseline curve in {curves}"
        );
        assert_eq!(
            curves.matches("<polygon").count(),
            2,
            "one band per strategy"
        );
        assert!(pixels_of(&plots[0].png, (line.0, line.1, line.2)) > 300);
        assert!(curves.contains("baseline") && curves.contains("kd"));
        // The Pareto plot marks the front (the teacher and the better student).
        let pareto = std::fs::read_to_string(&plots[2].svg).unwrap_or_default();
        assert!(pareto.contains("teacher s") && pareto.contains("s kd"));
        assert!(pixels_of(&plots[2].png, (color(3).0, color(3).1, color(3).2)) > 100);

        // Other data, other pictures.
        let again = write_plots(&dir.join("b"), &records(0.9), "accuracy")?;
        for (p, q) in plots.iter().zip(&again) {
            for (x, y) in [(&p.png, &q.png), (&p.svg, &q.svg)] {
                let (x, y) = (std::fs::read(x), std::fs::read(y));
                assert!(
                    x.is_ok() && y.is_ok() && x.ok() != y.ok(),
                    "{} does not follow the data",
                    p.title
                );
            }
        }
        let markdown = plots_markdown(&plots, &dir);
        assert!(markdown.contains(
            "![d · teacher none · student s: validation accuracy](a/curves-d-none-s.svg)"
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
