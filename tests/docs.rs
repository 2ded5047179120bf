//! The README stays true: its configuration reference and `portless run
//! --help` list the same options, each in the same section (its TOML
//! table), with the same environment variable and the same default. The
//! defaults in `--help` come from the configuration's one source of each
//! (a unit test in src/config checks that resolution uses those very
//! values), so this also checks the README against what portless does.

use std::collections::BTreeMap;
use std::process::Command;

/// One option as `--help` or the README shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Documented {
    /// The section heading, e.g. `DNS ([dns])`.
    section: String,
    env: String,
    /// None: no default.
    default: Option<String>,
}

/// The text of `[LABEL: ...]` in `text`, with nested brackets kept.
fn bracketed<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let start = text.find(&format!("[{label}: "))? + label.len() + 3;
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        match c {
            '[' => depth += 1,
            ']' if depth == 0 => return Some(&text[start..start + i]),
            ']' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `portless run --help`, by flag name. Each option's block (its lines up
/// to the next option or heading) is read whole, so wrapping does not
/// matter.
fn from_help() -> BTreeMap<String, Documented> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portless"));
    cmd.args(["run", "--help"]).env("COLUMNS", "100");
    // A variable set where the test runs would show in the help text.
    for (k, _) in std::env::vars() {
        if k.starts_with("PORTLESS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("portless run --help");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut section = String::new();
    for line in help.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':').to_owned();
        } else if line.trim_start().starts_with('-') {
            blocks.push((section.clone(), line.trim().to_owned()));
        } else if let Some((_, block)) = blocks.last_mut()
            && line.starts_with(' ')
        {
            block.push(' ');
            block.push_str(line.trim());
        }
    }
    let mut out = BTreeMap::new();
    for (section, block) in blocks {
        let Some(flag) = block
            .split_whitespace()
            .find_map(|w| w.strip_prefix("--"))
            .map(|w| w.trim_end_matches(',').to_owned())
        else {
            continue;
        };
        if flag == "help" {
            continue;
        }
        let block = collapse(&block);
        let env = bracketed(&block, "env")
            .map(|e| e.trim_end_matches('=').to_owned())
            .unwrap_or_else(|| panic!("--{flag} has no environment variable: {block}"));
        let default = bracketed(&block, "default").map(str::to_owned);
        let doc = Documented {
            section,
            env,
            default,
        };
        assert!(out.insert(flag.clone(), doc).is_none(), "--{flag} twice");
    }
    out
}

/// Cells of a Markdown table row; `\|` stays inside its cell.
fn cells(row: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = row.trim().trim_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap_or_else(|| unreachable!()).push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap_or_else(|| unreachable!()).push(c),
        }
    }
    out.iter().map(|c| c.trim().to_owned()).collect()
}

/// The README's configuration reference, by flag name.
fn from_readme() -> BTreeMap<String, Documented> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let reference = readme
        .split_once("\n## Configuration reference\n")
        .expect("a Configuration reference section")
        .1;
    let reference = reference.split("\n## ").next().unwrap_or(reference);
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for line in reference.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            section = h.replace('`', "");
            continue;
        }
        if !line.starts_with("| `--") {
            continue;
        }
        let c = cells(line);
        assert!(c.len() == 4, "README row without 4 cells: {line}");
        let flag = c[0]
            .trim_matches('`')
            .trim_start_matches("--")
            .split(' ')
            .next()
            .unwrap_or("")
            .to_owned();
        let default = collapse(&c[2].replace('`', ""));
        let doc = Documented {
            section: section.clone(),
            env: c[1].trim_matches('`').to_owned(),
            default: (default != "none").then_some(default),
        };
        assert!(
            out.insert(flag.clone(), doc).is_none(),
            "--{flag} twice in the README"
        );
    }
    out
}

#[test]
fn readme_reference_agrees_with_help_on_every_option() {
    let help = from_help();
    let readme = from_readme();
    assert!(help.len() >= 45, "only {} options in --help", help.len());
    let mut wrong = Vec::new();
    for (flag, h) in &help {
        let expected_env = format!("PORTLESS_{}", flag.to_uppercase().replace('-', "_"));
        if h.env != expected_env {
            wrong.push(format!("--{flag}: --help says {}", h.env));
        }
        match readme.get(flag) {
            None => wrong.push(format!("--{flag}: not in the README ({h:?})")),
            Some(r) if r != h => {
                wrong.push(format!("--{flag}:\n    --help: {h:?}\n    README: {r:?}"))
            }
            Some(_) => {}
        }
    }
    for flag in readme.keys().filter(|f| !help.contains_key(*f)) {
        wrong.push(format!("--{flag}: in the README, not in --help"));
    }
    assert!(
        wrong.is_empty(),
        "README.md and `portless run --help` disagree (a default in --help \
         comes from the config's defaults(); fix the README):\n{}",
        wrong.join("\n")
    );
}
