//! The soak's summary: a table for people (also written to soak.md), JSON for scripts, and
//! the verdict.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    attribution::{Attribution, Row, Why},
    plan::Kind,
};

/// Everything a soak run found.
pub struct Summary {
    /// The seed (replays the same events).
    pub seed: u64,
    /// The run's length as asked.
    pub seconds: u64,
    /// Open-loop rate, connections per second.
    pub rate: u32,
    /// Closed-loop clients.
    pub closed: u32,
    /// Where and when.
    pub machine: String,
    /// `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
    /// Connections started and answered.
    pub opened: u64,
    /// Connections answered in full.
    pub answered: u64,
    /// Failed connections, by event.
    pub attribution: Attribution,
    /// Why the run stopped early, if it did (an event that failed, Ctrl-C).
    pub aborted: Option<String>,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    seed: u64,
    seconds: u64,
    rate: u32,
    closed_clients: u32,
    date: &'a str,
    opened: u64,
    answered: u64,
    failed: u64,
    counted_failures: u64,
    unattributed: u64,
    lost_in_hand: u64,
    uncounted: u64,
    events: Vec<(Kind, &'a Row)>,
    by_why: Vec<(Why, u64)>,
    aborted: Option<&'a str>,
    passed: bool,
}

impl Summary {
    fn failed(&self) -> u64 {
        self.attribution.by_why.values().sum()
    }

    fn lost_in_hand(&self) -> u64 {
        self.attribution.rows.values().map(|r| r.lost_in_hand).sum()
    }

    /// Connections neither answered nor recorded as failed: a client bug, never expected.
    fn uncounted(&self) -> u64 {
        self.opened.saturating_sub(self.answered + self.failed())
    }

    /// Whether the run passed: it ran to the end, and no connection failed but those a killed
    /// worker held.
    pub fn passed(&self) -> bool {
        self.aborted.is_none()
            && self.attribution.counted_failures() == 0
            && self.uncounted() == 0
            && self.answered > 0
    }

    /// The table for people.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Chaos soak\n");
        let _ = writeln!(
            out,
            "Seed {} (replay the events: `cargo xtask soak --seconds {} --seed {}`). {} s of \
open-loop load at {}/s plus {} closed-loop client(s), against `balancer run` with 2 to 4 demo \
workers, while one event at a time happens, each followed by the group settling (every slot \
with a ready worker). {}. {}.\n",
            self.seed,
            self.seconds,
            self.seed,
            self.seconds,
            self.rate,
            self.closed,
            self.machine,
            self.date
        );
        let _ = writeln!(
            out,
            "| event | times | longest until settled | failed connections | lost in the killed worker's hands |"
        );
        let _ = writeln!(out, "|---|--:|--:|--:|--:|");
        for (kind, row) in &self.attribution.rows {
            let hands = if *kind == Kind::WorkerKill {
                row.lost_in_hand.to_string()
            } else {
                "–".into()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {hands} |",
                kind.label(),
                row.events,
                ms(row.longest),
                row.failed
            );
        }
        let _ = writeln!(
            out,
            "| no event (unattributed) | – | – | {} | – |\n",
            self.attribution.unattributed
        );
        let why: Vec<String> = self
            .attribution
            .by_why
            .iter()
            .map(|(w, n)| format!("{w:?} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "Connections: {} opened, {} answered, {} failed ({} of them held by a killed worker){}{}.\n",
            self.opened,
            self.answered,
            self.failed(),
            self.lost_in_hand(),
            if why.is_empty() {
                String::new()
            } else {
                format!("; by how: {}", why.join(", "))
            },
            match self.uncounted() {
                0 => String::new(),
                n => format!("; {n} neither answered nor failed"),
            }
        );
        let verdict = if self.passed() {
            "PASSED: no connection failed except those a killed worker held.".to_owned()
        } else if let Some(why) = &self.aborted {
            format!("FAILED: the soak stopped early: {why}")
        } else {
            format!(
                "FAILED: {} connection(s) failed that no killed worker held.",
                self.attribution.counted_failures() + self.uncounted()
            )
        };
        let _ = writeln!(out, "{verdict}");
        out
    }

    /// The summary as JSON.
    pub fn json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(&Json {
            seed: self.seed,
            seconds: self.seconds,
            rate: self.rate,
            closed_clients: self.closed,
            date: &self.date,
            opened: self.opened,
            answered: self.answered,
            failed: self.failed(),
            counted_failures: self.attribution.counted_failures(),
            unattributed: self.attribution.unattributed,
            lost_in_hand: self.lost_in_hand(),
            uncounted: self.uncounted(),
            events: self.attribution.rows.iter().map(|(k, r)| (*k, r)).collect(),
            by_why: self
                .attribution
                .by_why
                .iter()
                .map(|(w, n)| (*w, *n))
                .collect(),
            aborted: self.aborted.as_deref(),
            passed: self.passed(),
        })?)
    }

    /// Writes `root/<UTC date>/soak.md`; returns its path.
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let day = self.date.split(' ').next().unwrap_or("undated");
        let dir = root.join(day);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("soak.md");
        std::fs::write(&path, self.markdown())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

fn ms(d: Duration) -> String {
    if d.is_zero() {
        "–".into()
    } else {
        format!("{} ms", d.as_millis())
    }
}
