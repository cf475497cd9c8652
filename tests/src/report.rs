//! The controller's counters table (printed on SIGUSR1 and on exit), parsed by column name.
use std::net::SocketAddr;

use balancer::control::protocol::SlotState;
use balancer_common::SlotCounters;

/// The counters table's columns, as its header names them (`balancer/src/report.rs`).
pub const COLUMNS: [&str; 14] = [
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
];

/// One slot's row of the controller's counters table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Listen address.
    pub addr: SocketAddr,
    /// Slot.
    pub slot: u32,
    /// Worker pid, if one runs.
    pub pid: Option<u32>,
    /// Slot state.
    pub state: SlotState,
    /// Worker replacements.
    pub restarts: u32,
    /// The program's decision counters for this slot and address.
    pub counters: SlotCounters,
}

impl Row {
    /// New connections steered to this slot by any path: exactly what
    /// [`SlotCounters::selected`] counts (migrations and failed selections not included).
    pub fn selected(&self) -> u64 {
        self.counters.selected()
    }
}

/// The `none` row of one address: decisions the program could not charge to any slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unattributed {
    /// Listen address.
    pub addr: SocketAddr,
    /// The unattributed decision counters.
    pub counters: SlotCounters,
}

/// A parsed counters table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One row per address and slot, in table order.
    pub rows: Vec<Row>,
    /// The `none` rows, one per address that has any.
    pub unattributed: Vec<Unattributed>,
}

/// Parses the last counters table in `lines`, reading every column by its header name; `None`
/// when `lines` hold no table. Panics, naming the line, on a header that is not the 14 known
/// columns or on a row it cannot parse: a table the tests cannot read is a failure, never
/// fewer rows.
pub fn parse_report(lines: &[String]) -> Option<Report> {
    let start = lines
        .iter()
        .rposition(|l| l.split_whitespace().any(|c| c == "ADDRESS"))?;
    let header: Vec<&str> = lines[start].split_whitespace().collect();
    let mut sorted_header = header.clone();
    sorted_header.sort_unstable();
    let mut sorted_columns = COLUMNS.to_vec();
    sorted_columns.sort_unstable();
    assert_eq!(
        sorted_header, sorted_columns,
        "counters table header {:?} is not the columns {COLUMNS:?}",
        lines[start]
    );
    let mut report = Report::default();
    for line in lines[start + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
    {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.len() != header.len() {
            bad_row(
                line,
                format!(
                    "{} cells for the {} columns of {:?}",
                    cells.len(),
                    header.len(),
                    lines[start]
                ),
            );
        }
        let cell = |name: &str| -> &str {
            cells[header
                .iter()
                .position(|h| *h == name)
                .expect("the header was checked")]
        };
        let num = |name: &str| -> u64 { parse_cell(line, name, cell(name)) };
        let counters = SlotCounters {
            by_cpu: num("BY-CPU"),
            by_hash: num("BY-HASH"),
            by_round_robin: num("BY-RR"),
            by_least_loaded: num("BY-LL"),
            spilled: num("SPILLED"),
            fallback: num("FALLBACK"),
            migrated: num("MIGRATED"),
            select_error: num("SELECT-ERRORS"),
            refused: num("REFUSED"),
        };
        let addr = parse_cell(line, "ADDRESS", cell("ADDRESS"));
        if cell("SLOT") == "none" {
            for name in ["PID", "STATE", "RESTARTS"] {
                if cell(name) != "-" {
                    bad_row(
                        line,
                        format!(
                            "the unattributed row has {name} {:?}, not \"-\"",
                            cell(name)
                        ),
                    );
                }
            }
            report.unattributed.push(Unattributed { addr, counters });
            continue;
        }
        report.rows.push(Row {
            addr,
            slot: parse_cell(line, "SLOT", cell("SLOT")),
            pid: match cell("PID") {
                "-" => None,
                pid => Some(parse_cell(line, "PID", pid)),
            },
            state: parse_cell(line, "STATE", cell("STATE")),
            restarts: parse_cell(line, "RESTARTS", cell("RESTARTS")),
            counters,
        });
    }
    Some(report)
}

fn bad_row(line: &str, what: String) -> ! {
    panic!("counters table row {line:?}: {what}")
}

/// Parses the cell of column `name` in `line`, or panics naming both.
fn parse_cell<T: std::str::FromStr>(line: &str, name: &str, cell: &str) -> T
where
    T::Err: std::fmt::Display,
{
    cell.parse()
        .unwrap_or_else(|e| bad_row(line, format!("{name} {cell:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| (*l).to_owned()).collect()
    }

    const HEADER: &str = "ADDRESS     SLOT  PID  STATE    RESTARTS  BY-CPU  BY-HASH  FALLBACK  MIGRATED  SELECT-ERRORS  BY-RR  BY-LL  SPILLED  REFUSED";

    #[test]
    fn parses_every_column_of_a_slot_row() {
        let report = parse_report(&lines(&[
            "an older table, ignored",
            HEADER,
            "127.0.0.1:1  0     -    stopped  2         5       6        7         1         8              9      10     11       12",
            "127.0.0.1:1  1     42   backing-off  0     0       0        0         0         0              0      0      0        0",
            "",
            "after the table",
        ]))
        .unwrap();
        assert!(report.unattributed.is_empty());
        assert_eq!(report.rows.len(), 2);
        let counters = SlotCounters {
            by_cpu: 5,
            by_hash: 6,
            by_round_robin: 9,
            by_least_loaded: 10,
            spilled: 11,
            fallback: 7,
            migrated: 1,
            select_error: 8,
            refused: 12,
        };
        assert_eq!(
            report.rows[0],
            Row {
                addr: "127.0.0.1:1".parse().unwrap(),
                slot: 0,
                pid: None,
                state: SlotState::Stopped,
                restarts: 2,
                counters,
            }
        );
        // Every selection path, not migrations or failed selections: 5+6+9+10+11+7.
        assert_eq!(report.rows[0].selected(), 48);
        assert_eq!(report.rows[0].selected(), counters.selected());
        assert_eq!(report.rows[1].pid, Some(42));
        assert_eq!(report.rows[1].state, SlotState::BackingOff);
    }

    #[test]
    fn reads_columns_by_their_header_names() {
        let report = parse_report(&lines(&[
            "REFUSED  SPILLED  BY-LL  BY-RR  SELECT-ERRORS  MIGRATED  FALLBACK  BY-HASH  BY-CPU  RESTARTS  STATE  PID  SLOT  ADDRESS",
            "0        1        2      3      4              5         6         7        8       9         ready  77   3     [::1]:80",
        ]))
        .unwrap();
        let r = &report.rows[0];
        assert_eq!((r.slot, r.pid, r.restarts), (3, Some(77), 9));
        assert_eq!(r.addr, "[::1]:80".parse().unwrap());
        assert_eq!(r.state, SlotState::Ready);
        assert_eq!(
            r.counters,
            SlotCounters {
                by_cpu: 8,
                by_hash: 7,
                by_round_robin: 3,
                by_least_loaded: 2,
                spilled: 1,
                fallback: 6,
                migrated: 5,
                select_error: 4,
                refused: 0,
            }
        );
    }

    #[test]
    fn the_unattributed_row_is_kept_apart() {
        let report = parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  0     42   ready    0         3       0        0         0         0              0      0      0        0",
            "127.0.0.1:1  none  -    -        -         1       2        0         0         4              0      0      0        7",
            "",
        ]))
        .unwrap();
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.rows[0].slot, 0);
        assert_eq!(
            report.unattributed,
            [Unattributed {
                addr: "127.0.0.1:1".parse().unwrap(),
                counters: SlotCounters {
                    by_cpu: 1,
                    by_hash: 2,
                    select_error: 4,
                    refused: 7,
                    ..Default::default()
                },
            }]
        );
    }

    #[test]
    fn no_table_is_none() {
        assert_eq!(
            parse_report(&lines(&["listening on 127.0.0.1:1", ""])),
            None
        );
    }

    #[test]
    #[should_panic(expected = "counters table row \"127.0.0.1:1  0  42  ready  0  5")]
    fn a_short_row_panics_naming_it() {
        parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  0  42  ready  0  5  6  7  1  8",
        ]));
    }

    #[test]
    #[should_panic(expected = "STATE \"sleeping\"")]
    fn an_unknown_state_panics() {
        parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  0  42  sleeping  0  5  6  7  1  8  0  0  0  0",
        ]));
    }

    #[test]
    #[should_panic(expected = "unattributed row has PID \"42\"")]
    fn an_unattributed_row_with_a_pid_panics() {
        parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  none  42  -  -  5  6  7  1  8  0  0  0  0",
        ]));
    }

    #[test]
    #[should_panic(expected = "is not the columns")]
    fn an_unknown_header_panics() {
        parse_report(&lines(&[
            "ADDRESS  SLOT  PID  STATE  RESTARTS  BY-CPU  BY-HASH  FALLBACK  MIGRATED  SELECT-ERRORS",
            "127.0.0.1:1  0  -  stopped  2  5  6  7  1  8",
        ]));
    }
}
