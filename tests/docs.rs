//! The README stays true: every option of `portless run` is in its
//! configuration reference, with its environment variable.

use std::process::Command;

#[test]
fn readme_documents_every_run_option_and_its_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let out = Command::new(env!("CARGO_BIN_EXE_portless"))
        .args(["run", "--help"])
        .output()
        .expect("portless run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let mut missing = Vec::new();
    let mut checked = 0;
    for line in help.lines() {
        let line = line.trim_start();
        let Some(flag) = line
            .strip_prefix("--")
            .map(|rest| rest.split([' ', '=']).next().unwrap_or(""))
        else {
            continue;
        };
        if flag == "help" || flag.is_empty() {
            continue;
        }
        checked += 1;
        if !readme.contains(&format!("`--{flag}")) {
            missing.push(format!("--{flag}"));
        }
        let var = format!("PORTLESS_{}", flag.to_uppercase().replace('-', "_"));
        if !readme.contains(&var) {
            missing.push(var);
        }
    }
    assert!(
        checked >= 40,
        "only {checked} options found in --help: {help}"
    );
    assert!(
        missing.is_empty(),
        "README.md does not document: {missing:?}"
    );
}
