//! The queue and the workers over time, one panel per policy, as a PNG (plotters'
//! bitmap backend; text drawn with a bundled font through ab_glyph, so no system font
//! library is needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::sim::{Outcome, Policy};

/// Which count of a sample a line shows.
type Pick = fn(&crate::sim::Sample) -> u32;

static FONT: &[u8] = include_bytes!("fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

/// Draws `runs` (policy, outcome) of the trace `title` into `path`.
pub fn draw(path: &Path, title: &str, runs: &[(Policy, &Outcome)]) -> Result<(), String> {
    REGISTER.call_once(|| {
        if register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            panic!("the bundled font does not load");
        }
    });
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let height = 60 + 230 * runs.len() as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (head, body) = root.split_vertically(40);
    head.draw(&Text::new(
        title.to_string(),
        (12, 10),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(|e| err(&e))?;
    let end_h = runs.iter().map(|(_, o)| o.end).fold(1.0, f64::max) / 3600.0;
    let top = runs
        .iter()
        .flat_map(|(_, o)| o.series.iter().map(|s| s.ready.max(s.pods)))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.08;
    for ((policy, outcome), area) in runs.iter().zip(body.split_evenly((runs.len(), 1))) {
        let mut chart = ChartBuilder::on(&area)
            .caption(label(*policy), ("sans-serif", 15))
            .margin(6)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..end_h, 0.0..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("hours")
            .y_desc("count")
            .label_style(("sans-serif", 12))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        let series = |f: Pick| {
            outcome
                .series
                .iter()
                .map(move |s| (s.t / 3600.0, f(s) as f64))
                .collect::<Vec<_>>()
        };
        let lines: [(&str, RGBColor, Pick); 3] = [
            ("tickets ready in the queue", RGBColor(214, 39, 40), |s| {
                s.ready
            }),
            ("pods running a ticket", RGBColor(44, 160, 44), |s| s.busy),
            ("worker pods", RGBColor(31, 119, 180), |s| s.pods),
        ];
        for (name, color, f) in lines {
            chart
                .draw_series(LineSeries::new(series(f), color.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn label(policy: Policy) -> &'static str {
    match policy {
        Policy::Operator => "operator (Wrapped workers: busy workers report)",
        Policy::OperatorNative => "operator, Native workers (no reports)",
        Policy::OperatorWarm => "operator with warm workers (scaling.warmWorkers)",
        Policy::Keda => "KEDA defaults (RabbitMQ scaler over AMQP, HPA, 30 s grace)",
        Policy::Floor => "floor: instant workers up to maxWorkers",
    }
}
