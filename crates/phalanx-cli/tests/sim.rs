//! `phalanx sim` as a user runs it: plants listed, a planted bug reported
//! with its seed and a non-zero exit, a sound seed replayed byte for byte.

use std::process::Command;

fn sim(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_phalanx")).arg("sim").args(args).output().expect("phalanx runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn plants_are_listed_one_a_line() {
    let (status, out) = sim(&["--plant", "list"]);
    assert_eq!(status, 0);
    assert_eq!(out, "stale-fence\nack-before-fsync\nskip-read-barrier\ndouble-grant\n");
}

#[test]
fn a_planted_bug_is_reported_with_its_seed_and_fails_the_run() {
    let (status, out) = sim(&["--plant", "double-grant"]);
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("planted bug double-grant caught by seed"), "{out}");
    assert!(out.contains("replay: phalanx sim --seed"), "{out}");
    let (status, _) = sim(&["--plant", "no-such-bug"]);
    assert_eq!(status, 2);
}

#[test]
fn a_seed_replays_byte_for_byte() {
    let (status, first) = sim(&["--seed", "3"]);
    assert_eq!(status, 0, "{first}");
    let (_, second) = sim(&["--seed", "3"]);
    assert_eq!(first, second);
}
