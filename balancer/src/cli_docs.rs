//! What is generated from the CLI definition ([`Cli`]) for operators: shell completion scripts
//! and man pages. Generating both from the same clap definitions as the parser means they
//! cannot drift from what the binary accepts.
use std::{
    io,
    path::{Path, PathBuf},
};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, CompletionShell};

/// The name the scripts complete, and the man pages' name.
const BIN_NAME: &str = "balancer";

/// The completion script for `shell`. Built in memory: clap_complete panics when its writer
/// fails, and stdout may be a pipe whose reader has gone (`balancer completions bash | head`).
pub fn completion_script(shell: CompletionShell) -> Vec<u8> {
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut completed_command(), BIN_NAME, &mut script);
    script
}

/// [`Cli`] without its internal subcommands (`__exec-worker`, `__man`): clap_complete offers
/// hidden subcommands too, and an operator has no use for them. The subcommands themselves are
/// the parser's, cloned; the top level has no arguments of its own besides `--help` and
/// `--version`, which clap adds.
fn completed_command() -> clap::Command {
    Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .fold(
            clap::Command::new(BIN_NAME).version(env!("CARGO_PKG_VERSION")),
            clap::Command::subcommand,
        )
}

/// Writes balancer.1 and one page per visible subcommand (balancer-run.1, balancer-workers-scale.1,
/// …, the pages balancer.1's SUBCOMMANDS section refers to) into `dir`; returns their paths,
/// balancer.1 first.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    pages.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(BIN_NAME) && n.ends_with(".1"))
    });
    // balancer.1 sorts before balancer-*.1 by length, then the rest by name.
    pages.sort_by_key(|p| (p.as_os_str().len(), p.clone()));
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_names_the_visible_commands_and_hides_the_internal_ones() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            for word in ["run", "status", "workers", "restart", "scale", "listen"] {
                assert!(script.contains(word), "{shell:?} lacks {word}");
            }
            for hidden in ["__exec-worker", "__man"] {
                assert!(!script.contains(hidden), "{shell:?} offers {hidden}");
            }
        }
    }

    #[test]
    fn completions_offer_exactly_the_visible_subcommands_and_top_level_arguments() {
        let names = |c: &clap::Command| -> Vec<String> {
            c.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| s.get_name().to_owned())
                .collect()
        };
        let full = Cli::command();
        let completed = completed_command();
        assert_eq!(names(&completed), names(&full));
        assert!(completed.get_subcommands().all(|s| !s.is_hide_set()));
        // Should the top level gain an argument, the copy above must carry it too.
        assert_eq!(
            full.get_arguments().count(),
            0,
            "copy the new top-level argument"
        );
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand_with_its_options() {
        let dir = std::env::temp_dir().join(format!("balancer-man-{}", std::process::id()));
        let pages = write_man_pages(&dir).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let run = std::fs::read_to_string(dir.join("balancer-run.1")).unwrap();
        let top = std::fs::read_to_string(dir.join("balancer.1")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names[0], "balancer.1");
        for page in [
            "balancer-run.1",
            "balancer-status.1",
            "balancer-workers-scale.1",
            "balancer-completions.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("__")), "{names:?}");
        assert!(
            top.starts_with(".ie") || top.contains(".TH balancer 1"),
            "{top}"
        );
        assert!(top.contains("balancer\\-run(1)"), "{top}");
        assert!(run.contains("\\-\\-spill\\-depth"), "{run}");
    }
}
