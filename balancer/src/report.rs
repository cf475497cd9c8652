//! What the controller prints on stdout: one line per event that scripts wait for, and the
//! counters table (on SIGUSR1 and on exit). Logs go to stderr.
use std::io::Write;

use crate::{control::protocol::SlotState, steering::AddressCounters};

/// A slot as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// Worker pid, if one runs.
    pub pid: Option<u32>,
    /// What the slot is doing.
    pub state: SlotState,
    /// Times the slot's worker was replaced.
    pub restarts: u32,
}

/// Prints one line to stdout and flushes it, so that a reader on a pipe sees it at once.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Prints the counters table: one row per address and slot, then a blank line.
pub fn counters(counters: &[AddressCounters], slots: &[SlotView]) {
    line(&format_counters(counters, slots));
}

fn format_counters(counters: &[AddressCounters], slots: &[SlotView]) -> String {
    let mut rows = vec![[
        "ADDRESS",
        "SLOT",
        "PID",
        "STATE",
        "RESTARTS",
        "BY-CPU",
        "BY-HASH",
        "FALLBACK",
        "MIGRATED",
        "SELECT-ERRORS",
        "BY-RR",
        "BY-LL",
        "SPILLED",
        "REFUSED",
    ]
    .map(str::to_owned)
    .to_vec()];
    for a in counters {
        for (slot, c) in a.slots.iter().enumerate() {
            let view = slots.get(slot);
            rows.push(vec![
                a.addr.to_string(),
                slot.to_string(),
                view.and_then(|v| v.pid)
                    .map_or("-".into(), |p| p.to_string()),
                view.map_or("-".to_owned(), |v| v.state.to_string()),
                view.map_or(0, |v| v.restarts).to_string(),
                c.by_cpu.to_string(),
                c.by_hash.to_string(),
                c.fallback.to_string(),
                c.migrated.to_string(),
                c.select_error.to_string(),
                c.by_round_robin.to_string(),
                c.by_least_loaded.to_string(),
                c.spilled.to_string(),
                c.refused.to_string(),
            ]);
        }
        // Decisions the program could not charge to a slot; every column is filled so that a
        // script reading the table by position never meets a short row.
        let u = &a.unattributed;
        if u.selected() + u.select_error + u.refused > 0 {
            rows.push(vec![
                a.addr.to_string(),
                "none".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                u.by_cpu.to_string(),
                u.by_hash.to_string(),
                u.fallback.to_string(),
                u.migrated.to_string(),
                u.select_error.to_string(),
                u.by_round_robin.to_string(),
                u.by_least_loaded.to_string(),
                u.spilled.to_string(),
                u.refused.to_string(),
            ]);
        }
    }
    table(&rows)
}

/// Lays out rows as left-aligned columns two spaces apart; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use balancer_common::SlotCounters;

    #[test]
    fn table_has_a_header_and_a_row_per_slot() {
        let c = AddressCounters {
            addr: "127.0.0.1:8080".parse().unwrap(),
            slots: vec![
                SlotCounters {
                    by_cpu: 5,
                    spilled: 2,
                    ..Default::default()
                },
                SlotCounters::default(),
            ],
            unattributed: SlotCounters::default(),
        };
        let v = SlotView {
            pid: Some(42),
            state: SlotState::Ready,
            restarts: 1,
        };
        let text = format_counters(&[c], &[v.clone(), v]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ADDRESS"));
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "127.0.0.1:8080",
                "0",
                "42",
                "ready",
                "1",
                "5",
                "0",
                "0",
                "0",
                "0",
                "0",
                "0",
                "2",
                "0"
            ]
        );
    }
}
