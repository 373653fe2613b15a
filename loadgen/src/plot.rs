//! The sweep's picture: throughput and p99 latency against the mean session size, one line
//! per level of concurrency, as an SVG file.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

/// One point of the sweep, as plotted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub in_flight: usize,
    pub session_size_mean: f64,
    pub indicia_per_s: f64,
    pub latency_p99_ms: f64,
}

type Error = Box<dyn std::error::Error>;

/// A panel: where it is drawn, its quantity's name, and how to read it from a point.
type Panel<'a, 'b> = (
    &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    &'static str,
    fn(&Point) -> f64,
);

/// Writes the two panels side by side into `path`.
pub fn write_svg(points: &[Point], path: &Path) -> Result<(), Error> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let by_level = {
        let mut by_level: BTreeMap<usize, Vec<Point>> = BTreeMap::new();
        for point in points {
            by_level.entry(point.in_flight).or_default().push(*point);
        }
        for line in by_level.values_mut() {
            line.sort_by(|a, b| a.session_size_mean.total_cmp(&b.session_size_mean));
        }
        by_level
    };
    let x_max = points
        .iter()
        .map(|p| p.session_size_mean)
        .fold(1.0_f64, f64::max)
        * 1.5;
    let panels: [Panel<'_, '_>; 2] = [
        (&left, "indicia/s", |p| p.indicia_per_s),
        (&right, "p99 latency (ms)", |p| p.latency_p99_ms),
    ];
    for (area, label, value) in panels {
        let y_max = points.iter().map(value).fold(1.0_f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{label} vs mean session size"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.9_f64..x_max).log_scale(), 0.0_f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("indicia per session (log)")
            .y_desc(label)
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        for (index, (level, line)) in by_level.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            let data: Vec<(f64, f64)> = line
                .iter()
                .map(|p| (p.session_size_mean.max(1.0), value(p)))
                .collect();
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
                .label(format!("{level} in flight"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(
                data.into_iter()
                    .map(|xy| Circle::new(xy, 4, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_an_svg_with_both_panels_and_every_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.svg");
        let points: Vec<Point> = [
            (8, 1.0, 2_300.0, 6.1),
            (8, 3.8, 7_000.0, 2.7),
            (64, 1.0, 2_800.0, 32.3),
            (64, 30.1, 20_400.0, 4.6),
        ]
        .into_iter()
        .map(
            |(in_flight, session_size_mean, indicia_per_s, latency_p99_ms)| Point {
                in_flight,
                session_size_mean,
                indicia_per_s,
                latency_p99_ms,
            },
        )
        .collect();
        write_svg(&points, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("indicia/s vs mean session size"));
        assert!(svg.contains("p99 latency (ms) vs mean session size"));
        assert!(svg.contains("64 in flight") && svg.contains("8 in flight"));
        assert!(
            svg.matches("<polyline").count() >= 4,
            "a line per level per panel"
        );
    }
}
