//! `linkreduce plot`: a PNG of a `linkreduce bench --json` report, the
//! latency and bus-bandwidth curves nccl-tests users draw by hand.
//!
//! Text is rasterised by plotters' pure-Rust `ab_glyph` backend from a TTF
//! read at run time, so the binary links no fontconfig or freetype and runs
//! on bare GPU machines.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use plotters::coord::combinators::{BindKeyPoints, WithKeyPoints};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::prelude::*;
use serde::Deserialize;

use crate::error::{CliError, Result};
use crate::sizes::format_size;

#[derive(clap::Args)]
pub struct Args {
    /// JSON report written by `linkreduce bench --json`.
    json: PathBuf,
    /// PNG to write (default: the JSON path with a .png extension).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// The fields of bench's report that the picture uses; everything else in
/// the file is ignored so bench can grow without breaking old plots.
#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    command: String,
    #[serde(default)]
    gpus: Vec<String>,
    #[serde(default)]
    world_size: usize,
    /// How the ranks ran, if the report says.
    #[serde(default)]
    mode: Option<String>,
    /// The op timed; reports from before `--op` are all-reduce reports.
    #[serde(default)]
    op: Option<String>,
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    bytes: u64,
    implementation: String,
    mode: String,
    // serde_json writes a NaN (a failed measurement) as null.
    time_us: Option<f64>,
    busbw_gbps: Option<f64>,
    #[serde(default)]
    dtype: Option<String>,
}

const SIZE: (u32, u32) = (1600, 1200);

pub fn run(args: Args) -> Result<ExitCode> {
    let out = args
        .output
        .unwrap_or_else(|| args.json.with_extension("png"));
    let name = args.json.display().to_string();
    let text = std::fs::read_to_string(&args.json).map_err(|source| CliError::Io {
        action: "read",
        path: args.json.clone(),
        source,
    })?;
    draw(&text, &name, &out)?;
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Draws the report (bench's JSON text) as a PNG at `out`.
pub fn render(report_json: &str, out: &Path) -> Result<()> {
    draw(report_json, "the report", out)
}

/// `render`, naming the input as `source` in errors about its contents.
fn draw(report_json: &str, source: &str, out: &Path) -> Result<()> {
    let report: Report =
        serde_json::from_str(report_json).map_err(|error| CliError::NotAReport {
            input: source.to_string(),
            source: error,
        })?;
    if let Some(op) = report.op.as_deref().filter(|&op| sized_by(op).is_none()) {
        return Err(CliError::NotASizeSweep {
            input: source.to_string(),
            op: op.to_string(),
        });
    }
    // Log axes cannot show zero or negative values; such rows are failures.
    let rows: Vec<&Row> = (report.rows.iter())
        .filter(|r| r.bytes > 0 && r.time_us.is_some_and(|t| t > 0.0 && t.is_finite()))
        .collect();
    if rows.is_empty() {
        return Err(CliError::NothingToPlot {
            input: source.to_string(),
        });
    }
    register_font()?;

    // CUDA-graph replays first: that is how inference runs all-reduces.
    let mut modes = first_seen(rows.iter().map(|r| r.mode.as_str()));
    modes.sort_by_key(|m| match *m {
        "graph" => 0,
        "eager" => 1,
        _ => 2,
    });
    let implementations = first_seen(rows.iter().map(|r| r.implementation.as_str()));

    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let (header, body) = root.split_vertically(90);
    let header = header
        .titled(&title(&report, &rows), ("sans-serif", 32))
        .map_err(draw_error)?;
    // The command line says how the figures were produced (sizes, repetitions).
    let command: String = report.command.chars().take(170).collect();
    header
        .titled(
            &command,
            ("sans-serif", 17).into_font().color(&RGBColor(90, 90, 90)),
        )
        .map_err(draw_error)?;

    let panels = body.split_evenly((modes.len(), 2));
    for (mode, pair) in modes.iter().zip(panels.chunks(2)) {
        let of_mode: Vec<&Row> = rows.iter().copied().filter(|r| r.mode == *mode).collect();
        let what = match *mode {
            "graph" => "CUDA-graph replay",
            "eager" => "eager launches",
            other => other,
        };
        let latency = |r: &Row| r.time_us.unwrap_or(f64::NAN);
        let busbw = |r: &Row| r.busbw_gbps.unwrap_or(f64::NAN);
        panel(
            &pair[0],
            &of_mode,
            &implementations,
            Metric::Latency,
            what,
            latency,
        )?;
        panel(
            &pair[1],
            &of_mode,
            &implementations,
            Metric::BusBw,
            what,
            busbw,
        )?;
    }
    root.present().map_err(|e| CliError::PlotWrite {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Metric {
    Latency,
    BusBw,
}

/// One chart: every implementation's curve of one metric in one mode.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    rows: &[&Row],
    implementations: &[&str],
    metric: Metric,
    mode: &str,
    value: impl Fn(&Row) -> f64,
) -> Result<()> {
    let (lo, hi) = min_max(rows.iter().map(|r| r.bytes as f64));
    // Pad by a fraction of a power of two so end points sit off the frame.
    let (left, right) = (lo / 1.4, hi * 1.4);
    // Points outside the range would still be drawn, into the label area.
    let inside = |v: &f64| (left..=right).contains(v);
    let x_ticks = size_ticks(lo, hi).into_iter().filter(inside).collect();
    let x_light = (0..63).map(|e| (1u64 << e) as f64).filter(inside);
    let x_axis = (left..right)
        .log_scale()
        .with_key_points(x_ticks)
        .with_light_points(x_light);

    let (ylo, yhi) = min_max(rows.iter().map(|r| value(r)).filter(|v| v.is_finite()));
    let (caption, y_desc) = match metric {
        Metric::Latency => (format!("{mode}: time per call"), "time per call (us)"),
        Metric::BusBw => (format!("{mode}: bus bandwidth"), "bus bandwidth (GB/s)"),
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(78);
    match metric {
        // Latency spans decades: log-log with 1-2-5 ticks.
        Metric::Latency => {
            // Padding by 1.5 leaves room for at least one grid value.
            let (bottom, top) = (ylo / 1.5, yhi * 1.5);
            let (ticks, light) = decade_ticks(bottom, top);
            let y_axis = (bottom..top)
                .log_scale()
                .with_key_points(ticks)
                .with_light_points(light);
            let mut chart = builder
                .build_cartesian_2d(x_axis, y_axis)
                .map_err(draw_error)?;
            mesh(&mut chart, y_desc)?;
            curves(&mut chart, rows, implementations, &value)?;
            legend(&mut chart)
        }
        // Bandwidth is read against zero, so a linear axis from 0.
        Metric::BusBw => {
            let top = if yhi > 0.0 { yhi * 1.1 } else { 1.0 };
            let mut chart = builder
                .build_cartesian_2d(x_axis, 0.0..top)
                .map_err(draw_error)?;
            mesh(&mut chart, y_desc)?;
            curves(&mut chart, rows, implementations, &value)?;
            legend(&mut chart)
        }
    }
}

type Chart<'a, Y> =
    ChartContext<'a, BitMapBackend<'a>, Cartesian2d<WithKeyPoints<LogCoord<f64>>, Y>>;

/// Axes, labels and grid, alike in every panel.
fn mesh<Y>(chart: &mut Chart<'_, Y>, y_desc: &str) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("message size (bytes)")
        .y_desc(y_desc)
        .x_label_formatter(&|v| format_size(v.round() as usize))
        .y_label_formatter(&|v| format_number(*v))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .bold_line_style(RGBColor(200, 200, 200))
        .light_line_style(RGBColor(236, 236, 236))
        // Only the linear bandwidth axis uses this: one line between labels.
        .y_max_light_lines(1)
        .draw()
        .map_err(draw_error)
}

fn legend<Y>(chart: &mut Chart<'_, Y>) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        // Both curves rise with size, so the upper left stays empty.
        .position(SeriesLabelPosition::UpperLeft)
        .margin(12)
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(draw_error)
}

/// One coloured line with point markers per implementation.
fn curves<Y>(
    chart: &mut Chart<'_, Y>,
    rows: &[&Row],
    implementations: &[&str],
    value: &impl Fn(&Row) -> f64,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    for (index, name) in implementations.iter().enumerate() {
        let mut points: Vec<(f64, f64)> = (rows.iter())
            .filter(|r| r.implementation == *name && value(r).is_finite())
            .map(|r| (r.bytes as f64, value(r)))
            .collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = color_of(name, index);
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
            .map_err(draw_error)?;
        // Filled markers show where the measured sizes are.
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(draw_error)?
            .label(label_of(name))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (26, 0)], color.stroke_width(3))
                    + Circle::new((13, 0), 4, color.filled())
            });
    }
    Ok(())
}

/// What a row's size measures in a report of `op`, for the ops whose
/// reports are size sweeps; None for the others. Reports from before
/// `--op` are all-reduce reports.
fn sized_by(op: &str) -> Option<&'static str> {
    match op {
        "all-reduce" => Some(""),
        "reduce-scatter" => Some(" (size: each rank's receive block)"),
        "all-gather" => Some(" (size: each rank's send block)"),
        _ => None,
    }
}

/// "all-reduce bf16 on 8 × NVIDIA H100 80GB HBM3, world size 8".
fn title(report: &Report, rows: &[&Row]) -> String {
    let dtypes = first_seen(rows.iter().filter_map(|r| r.dtype.as_deref()));
    let op = report.op.as_deref().unwrap_or("all-reduce");
    let mut title = format!("{op} {}", dtypes.join("/")).trim_end().to_string();
    let names = first_seen(report.gpus.iter().map(String::as_str));
    let gpus: Vec<String> = (names.iter())
        .map(|name| {
            let count = report.gpus.iter().filter(|g| g == name).count();
            if count > 1 {
                format!("{count} × {name}")
            } else {
                name.to_string()
            }
        })
        .collect();
    if !gpus.is_empty() {
        title += &format!(" on {}", gpus.join(", "));
    }
    if report.world_size > 0 {
        title += &format!(", world size {}", report.world_size);
    }
    if let Some(mode) = &report.mode {
        title += &format!(" ({mode})");
    }
    title + sized_by(op).unwrap_or_default()
}

/// The names bench prints for its implementations.
fn label_of(implementation: &str) -> String {
    serde_json::from_value::<crate::bench::Implementation>(implementation.into())
        .map_or_else(|_| implementation.to_string(), |known| known.to_string())
}

/// Fixed colours per known implementation so plots of different runs match.
fn color_of(implementation: &str, index: usize) -> RGBColor {
    match implementation {
        "auto" => RGBColor(31, 119, 180),
        "one-stage" => RGBColor(255, 127, 14),
        "two-stage" => RGBColor(44, 160, 44),
        "push" => RGBColor(188, 189, 34),
        "nccl" => RGBColor(214, 39, 40),
        "nccl-symmetric" => RGBColor(148, 103, 189),
        _ => {
            let spare = [
                (140, 86, 75),
                (227, 119, 194),
                (127, 127, 127),
                (23, 190, 207),
            ];
            let (r, g, b) = spare[index % spare.len()];
            RGBColor(r, g, b)
        }
    }
}

/// Distinct values in the order they first appear.
fn first_seen<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() {
        (lo, hi)
    } else {
        (1.0, 1.0)
    }
}

/// Powers of two covering [lo, hi], thinned to at most ~10 labels.
fn size_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.log2().floor() as i32, hi.log2().ceil() as i32);
    let step = ((last - first) / 10 + 1).max(1);
    (first.max(0)..=last.min(62))
        .filter(|e| e % step == 0)
        .map(|e| (1u64 << e) as f64)
        .collect()
}

/// Labelled 1-2-5 ticks and 1..9 grid lines per decade over [lo, hi].
fn decade_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut ticks, mut light) = (Vec::new(), Vec::new());
    for exponent in (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32) {
        let decade = 10f64.powi(exponent);
        for m in 1..10 {
            let v = m as f64 * decade;
            if v >= lo && v <= hi {
                light.push(v);
                if matches!(m, 1 | 2 | 5) {
                    ticks.push(v);
                }
            }
        }
    }
    // A narrow range may hold no 1-2-5 value: label every grid line then.
    if ticks.is_empty() {
        ticks = light.clone();
    }
    (ticks, light)
}

/// `1000` -> `1000`, `0.5` -> `0.5`: no float noise on tick labels.
fn format_number(v: f64) -> String {
    let text = format!("{v:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn draw_error(e: impl std::fmt::Display) -> CliError {
    CliError::Plot(e.to_string())
}

const NO_FONT: &str =
    "no TrueType font found for the plot's labels; set LINKREDUCE_FONT to a .ttf file";

/// Registers a system TTF as "sans-serif", once per process: plotters
/// keeps fonts in a global table and wants `'static` bytes.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let outcome = REGISTERED.get_or_init(|| {
        let path = find_font(std::env::var_os("LINKREDUCE_FONT").map(PathBuf::from))
            .ok_or_else(|| NO_FONT.to_string())?;
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read font {}: {e}; set LINKREDUCE_FONT to a readable .ttf file",
                path.display()
            )
        })?;
        // Leaked once per process; the table keeps it for the process anyway.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
            format!(
                "{} is not a usable TrueType font; set LINKREDUCE_FONT to a .ttf file",
                path.display()
            )
        })
    });
    outcome.clone().map_err(CliError::Font)
}

/// The font to use: the one named by LINKREDUCE_FONT (even if missing, so a
/// typo is reported rather than silently replaced), else a common system one.
fn find_font(from_env: Option<PathBuf>) -> Option<PathBuf> {
    if from_env.is_some() {
        return from_env;
    }
    const KNOWN: [&str; 4] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    if let Some(known) = KNOWN.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(known);
    }
    // One level of /usr/share/fonts/truetype/*/, sorted so the pick is stable.
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/share/fonts/truetype")
        .ok()?
        .flatten()
        .filter_map(|dir| std::fs::read_dir(dir.path()).ok())
        .flat_map(|files| files.flatten().map(|f| f.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")))
        .collect();
    found.sort();
    found.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two implementations, both modes, power-of-two sizes and one that is
    /// not, and an extra field (`count`) the plot does not read.
    fn report() -> String {
        let mut rows = Vec::new();
        for mode in ["eager", "graph"] {
            for (implementation, scale) in [("auto", 1.0), ("nccl", 1.8)] {
                for bytes in [1024u64, 3000, 65536, 1 << 20, 16 << 20] {
                    let launch = if mode == "eager" { 8.0 } else { 4.0 };
                    let time_us = scale * (launch + bytes as f64 / 200_000.0);
                    let busbw_gbps = 1.5 * bytes as f64 / time_us / 1e3;
                    rows.push(serde_json::json!({
                        "bytes": bytes, "count": bytes / 2, "dtype": "bf16",
                        "implementation": implementation, "mode": mode,
                        "time_us": time_us, "algbw_gbps": busbw_gbps / 1.5,
                        "busbw_gbps": busbw_gbps, "wrong": 0, "speedup_vs_nccl": null,
                    }));
                }
            }
        }
        // A failed measurement: bench's NaN arrives as null and is skipped.
        rows.push(serde_json::json!({
            "bytes": 4096, "implementation": "nccl", "mode": "graph",
            "time_us": null, "busbw_gbps": null,
        }));
        serde_json::json!({
            "command": "linkreduce bench --sizes 1K,3000,64K,1M,16M --json r.json",
            "gpus": ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"],
            "driver": "13.0", "nccl": "2.28.3", "world_size": 2, "max_blocks": 36,
            "rows": rows,
        })
        .to_string()
    }

    /// A fresh folder per test, since tests run in parallel.
    fn scratch(test: &str) -> PathBuf {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("linkreduce-plot-{test}-{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn renders_a_png() {
        let dir = scratch("render");
        let out = dir.join("report.png");
        let outcome = render(&report(), &out);
        match outcome {
            Ok(()) => {
                let bytes = std::fs::read(&out).unwrap();
                assert!(bytes.len() > 1000, "PNG of {} bytes", bytes.len());
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            }
            // Without a font the only acceptable failure is the clear one.
            Err(e) => {
                assert!(
                    find_font(std::env::var_os("LINKREDUCE_FONT").map(PathBuf::from)).is_none()
                );
                assert!(e.to_string().contains(NO_FONT), "{e}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn titles_name_the_op_and_what_its_size_measures() {
        let mut json: serde_json::Value = serde_json::from_str(&report()).unwrap();
        let title_of = |json: &serde_json::Value| {
            let report: Report = serde_json::from_value(json.clone()).unwrap();
            title(&report, &report.rows.iter().collect::<Vec<_>>())
        };
        assert_eq!(
            title_of(&json),
            "all-reduce bf16 on 2 × NVIDIA H100 80GB HBM3, world size 2"
        );
        json["op"] = "reduce-scatter".into();
        assert_eq!(
            title_of(&json),
            "reduce-scatter bf16 on 2 × NVIDIA H100 80GB HBM3, world size 2 \
             (size: each rank's receive block)"
        );
        json["op"] = "all-gather".into();
        assert!(title_of(&json).ends_with("(size: each rank's send block)"));
    }

    #[test]
    fn bad_input_is_an_error() {
        let dir = scratch("bad");
        let out = dir.join("bad.png");
        for json in ["not json", "{\"rows\": 3}", "{\"rows\": []}"] {
            let error = render(json, &out).unwrap_err();
            assert!(
                matches!(
                    error,
                    CliError::NotAReport { .. } | CliError::NothingToPlot { .. }
                ),
                "{error}"
            );
        }
        let fused = render("{\"op\": \"fused-norm\", \"rows\": []}", &out).unwrap_err();
        assert_eq!(
            fused.to_string(),
            "the report is a `bench --op fused-norm` report; `linkreduce plot` draws \
             the all-reduce, reduce-scatter and all-gather reports only (the table and the \
             JSON hold its figures)"
        );
        let error = render("{\"rows\": []}", &out).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the report has no rows with a positive size and time to plot"
        );
        assert!(!out.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tick_helpers() {
        assert_eq!(size_ticks(1024.0, 4096.0), [1024.0, 2048.0, 4096.0]);
        assert_eq!(size_ticks(1024.0, (256 << 20) as f64).len(), 10);
        assert_eq!(decade_ticks(3.0, 60.0).0, [5.0, 10.0, 20.0, 50.0]);
        assert_eq!(decade_ticks(3.1, 4.9).0, [4.0]);
        assert_eq!(format_number(0.5), "0.5");
        assert_eq!(format_number(1000.0), "1000");
    }
}
