//! The simulation in CI: a fixed set of seeds on 3 and 5 nodes must keep
//! every invariant, each planted bug must be caught within the default
//! number of seeds, and a seed must replay to the same report.
//!
//! Sized to a few minutes on a 2-core machine (`BENCHMARKS.md` has the
//! rates). A failure names the seed and the command that replays it.

use phalanx_sim::{Options, Plant};

/// `phalanx sim`'s default number of seeds: a planted bug must show within it.
const DEFAULT_SEEDS: u64 = 20;

fn replay(seed: u64, options: &Options) -> String {
    let mut command =
        format!("phalanx sim --seed {seed} --node-count {} --fault-ms {}", options.nodes, options.fault_ms);
    if let Some(plant) = options.plant {
        command.push_str(&format!(" --plant {}", plant.name()));
    }
    command
}

fn sound_for(seeds: std::ops::Range<u64>, nodes: u64) {
    let options = Options { nodes, ..Options::default() };
    for seed in seeds {
        let report = phalanx_sim::run(seed, &options);
        assert!(report.ok(), "{}replay: {}", report.render(), replay(seed, &options));
    }
}

#[test]
fn three_nodes_keep_every_invariant() {
    sound_for(1..121, 3);
}

#[test]
fn five_nodes_keep_every_invariant() {
    sound_for(1..31, 5);
}

#[test]
fn every_planted_bug_is_caught() {
    for plant in Plant::ALL {
        let options = Options { plant: Some(plant), ..Options::default() };
        let caught = (1..=DEFAULT_SEEDS).find(|seed| !phalanx_sim::run(*seed, &options).ok());
        assert!(caught.is_some(), "planted bug {} was not caught in {DEFAULT_SEEDS} seeds", plant.name());
    }
}

#[test]
fn a_seed_replays_to_the_same_report() {
    let options = Options::default();
    let first = phalanx_sim::run(42, &options).render();
    let second = phalanx_sim::run(42, &options).render();
    assert_eq!(first, second);
    assert!(first.contains("submits_acknowledged="), "{first}");
}
