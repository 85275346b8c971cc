//! One row per measured thing: our figure, the baseline measured in the
//! same run, their ratio, the goal and whether it was met; printed as one
//! table and written as JSON.

use serde_json::{Value, json};

/// What a row must reach to be met.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Goal {
    /// Informational: no goal.
    None,
    /// Our figure at most this.
    AtMost(f64),
    /// Our figure at least this.
    AtLeast(f64),
    /// ours / baseline at most this.
    RatioAtMost(f64),
    /// ours / baseline at least this.
    RatioAtLeast(f64),
    /// ours − baseline at most this (an added cost per call).
    OverheadAtMost(f64),
}

/// One measured thing.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// `platform`, `bus`, `outbox`, …
    pub(crate) group: String,
    /// What is measured, in words.
    pub(crate) what: String,
    /// The unit of `ours` and `baseline` (`msg/s`, `ms`, `µs`, `%`, …).
    pub(crate) unit: String,
    pub(crate) ours: Option<f64>,
    /// What the baseline is (`bare axum + producer`, `raw rdkafka`, …).
    pub(crate) baseline_name: String,
    pub(crate) baseline: Option<f64>,
    pub(crate) goal: Goal,
}

impl Row {
    pub(crate) fn new(group: &str, what: impl Into<String>, unit: &str) -> Self {
        Self {
            group: group.to_owned(),
            what: what.into(),
            unit: unit.to_owned(),
            ours: None,
            baseline_name: String::new(),
            baseline: None,
            goal: Goal::None,
        }
    }

    pub(crate) fn ours(mut self, v: Option<f64>) -> Self {
        self.ours = v;
        self
    }

    pub(crate) fn baseline(mut self, name: &str, v: Option<f64>) -> Self {
        self.baseline_name = name.to_owned();
        self.baseline = v;
        self
    }

    pub(crate) fn goal(mut self, g: Goal) -> Self {
        self.goal = g;
        self
    }

    /// ours / baseline, when both are there and the baseline is not 0.
    pub(crate) fn ratio(&self) -> Option<f64> {
        match (self.ours, self.baseline) {
            (Some(o), Some(b)) if b != 0.0 && o.is_finite() && b.is_finite() => Some(o / b),
            _ => None,
        }
    }

    /// `Some(true)` met, `Some(false)` missed, `None` no goal or no figure.
    pub(crate) fn met(&self) -> Option<bool> {
        let ours = self.ours?;
        match self.goal {
            Goal::None => None,
            Goal::AtMost(g) => Some(ours <= g),
            Goal::AtLeast(g) => Some(ours >= g),
            Goal::RatioAtMost(g) => self.ratio().map(|r| r <= g),
            Goal::RatioAtLeast(g) => self.ratio().map(|r| r >= g),
            Goal::OverheadAtMost(g) => self.baseline.map(|b| ours - b <= g),
        }
    }

    fn goal_text(&self) -> String {
        let u = &self.unit;
        match self.goal {
            Goal::None => String::new(),
            Goal::AtMost(g) => format!("≤ {} {u}", num(g)),
            Goal::AtLeast(g) => format!("≥ {} {u}", num(g)),
            Goal::RatioAtMost(g) => format!("ratio ≤ {}", num(g)),
            Goal::RatioAtLeast(g) => format!("ratio ≥ {}", num(g)),
            Goal::OverheadAtMost(g) => format!("+ ≤ {} {u}", num(g)),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let f = |v: Option<f64>| v.filter(|x| x.is_finite());
        json!({
            "group": self.group,
            "what": self.what,
            "unit": self.unit,
            "ours": f(self.ours),
            "ours_unbounded": self.ours.is_some_and(f64::is_infinite),
            "baseline_name": self.baseline_name,
            "baseline": f(self.baseline),
            "ratio": f(self.ratio()),
            "goal": self.goal_text(),
            "met": self.met(),
        })
    }
}

/// A figure with 3 significant digits (no exponent), `∞` or `–`.
pub(crate) fn num(v: f64) -> String {
    if v.is_infinite() {
        return "∞".to_owned();
    }
    if v.is_nan() {
        return "–".to_owned();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "–".to_owned())
}

/// The table as text: one header, one line per row, columns padded.
pub(crate) fn render(rows: &[Row]) -> String {
    let header = [
        "group", "measured", "ours", "baseline", "base is", "ratio", "goal", "met",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let with_unit = |v: Option<f64>| match v {
                Some(x) => format!("{} {}", num(x), r.unit),
                None => "–".to_owned(),
            };
            [
                r.group.clone(),
                r.what.clone(),
                with_unit(r.ours),
                with_unit(r.baseline),
                r.baseline_name.clone(),
                opt(r.ratio()),
                r.goal_text(),
                match r.met() {
                    Some(true) => "yes".to_owned(),
                    Some(false) => "NO".to_owned(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let width = |i: usize| {
        cells
            .iter()
            .map(|c| c[i].chars().count())
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cols: &[String]| {
        cols.iter()
            .enumerate()
            .map(|(i, c)| format!("{c}{}", " ".repeat(widths[i] - c.chars().count())))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header.map(str::to_owned));
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-"),
    );
    out.push('\n');
    for c in &cells {
        out.push_str(&line(c));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_judged_on_the_figure_or_the_ratio() {
        let r = Row::new("platform", "POST p99", "ms")
            .ours(Some(40.0))
            .baseline("bare", Some(10.0));
        assert_eq!(r.ratio(), Some(4.0));
        assert_eq!(r.clone().goal(Goal::AtMost(50.0)).met(), Some(true));
        assert_eq!(r.clone().goal(Goal::AtMost(39.9)).met(), Some(false));
        assert_eq!(r.clone().goal(Goal::AtLeast(40.0)).met(), Some(true));
        assert_eq!(r.clone().goal(Goal::RatioAtMost(3.0)).met(), Some(false));
        assert_eq!(r.clone().goal(Goal::RatioAtLeast(0.5)).met(), Some(true));
        assert_eq!(r.clone().goal(Goal::OverheadAtMost(30.0)).met(), Some(true));
        assert_eq!(
            r.clone().goal(Goal::OverheadAtMost(29.0)).met(),
            Some(false)
        );
        assert_eq!(r.clone().met(), None);
        // No baseline: a ratio goal cannot be judged; no figure: nothing can.
        let alone = Row::new("g", "x", "ms").ours(Some(1.0));
        assert_eq!(alone.goal(Goal::RatioAtMost(2.0)).met(), None);
        assert_eq!(Row::new("g", "x", "ms").goal(Goal::AtMost(1.0)).met(), None);
        // An unanswered tail misses an upper bound.
        let inf = Row::new("g", "x", "ms").ours(Some(f64::INFINITY));
        assert_eq!(inf.goal(Goal::AtMost(500.0)).met(), Some(false));
    }

    #[test]
    fn json_has_no_infinities_and_says_so() {
        let r = Row::new("platform", "send→completed p99", "ms")
            .ours(Some(f64::INFINITY))
            .baseline("bare", Some(0.0))
            .goal(Goal::AtMost(500.0));
        let v = r.to_json();
        assert_eq!(v["ours"], Value::Null);
        assert_eq!(v["ours_unbounded"], true);
        assert_eq!(v["ratio"], Value::Null);
        assert_eq!(v["met"], false);
        assert_eq!(v["goal"], "≤ 500 ms");
        // It serialises (serde_json refuses NaN/inf only as numbers).
        assert!(serde_json::to_string(&v).is_ok());
    }

    #[test]
    fn the_table_lines_up() {
        let rows = vec![
            Row::new("platform", "accepted", "msg/s")
                .ours(Some(498.7))
                .baseline("bare", Some(1234.0))
                .goal(Goal::AtLeast(500.0)),
            Row::new("bus", "durable publish", "µs").ours(Some(0.0123)),
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("499 msg/s"), "{t}");
        assert!(lines[2].contains("1234 msg/s"), "{t}");
        assert!(lines[2].contains("0.404"), "{t}");
        assert!(lines[2].ends_with("NO"), "{t}");
        assert!(lines[3].contains("0.012 µs"), "{t}");
        // Every column separator sits at the same place on every line.
        let bars = |l: &str| {
            l.char_indices()
                .filter(|(_, c)| *c == '|')
                .map(|(i, _)| l[..i].chars().count())
                .collect::<Vec<_>>()
        };
        assert_eq!(bars(lines[0]), bars(lines[2])[..bars(lines[0]).len()]);
        assert_eq!(bars(lines[2])[..5], bars(lines[3])[..5]);
    }

    #[test]
    fn figures_keep_three_digits() {
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(f64::INFINITY), "∞");
    }
}
