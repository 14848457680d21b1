//! `phalanx sim`: the seeded simulation of a whole cluster (`phalanx-sim`).
//!
//! `--seed S` replays one run and prints its report (the same bytes for the
//! same seed; wall-clock figures go to standard error); `--seeds N` runs N
//! seeds from `--first` and stops at the first that breaks an invariant,
//! printing it with the command that replays it; `--plant NAME` plants a
//! known bug and shows the seed that catches it (`--plant list` names them).
//! The exit status is non-zero when an invariant broke.

use clap::Args;
use phalanx_sim::{Options, Plant};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct SimArgs {
    /// Replay this one seed.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run this many seeds (from `--first`), stopping at the first failure.
    #[arg(long, default_value_t = 20)]
    pub seeds: u64,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 1)]
    pub first: u64,
    /// How many nodes the simulated cluster has (3 to 5).
    #[arg(long, short = 'n', default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    pub node_count: u64,
    /// Simulated milliseconds of faults per run (then everything heals).
    #[arg(long, default_value_t = 20_000)]
    pub fault_ms: u64,
    /// Plant a known bug (`list` prints their names).
    #[arg(long)]
    pub plant: Option<String>,
    /// Print every seed's report, not only the failing one's.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(args: SimArgs) -> ExitCode {
    let plant = match args.plant.as_deref() {
        None => None,
        Some("list") => {
            for plant in Plant::ALL {
                println!("{}", plant.name());
            }
            return ExitCode::SUCCESS;
        }
        Some(name) => match Plant::parse(name) {
            Some(plant) => Some(plant),
            None => {
                let names: Vec<&str> = Plant::ALL.iter().map(|p| p.name()).collect();
                eprintln!("phalanx: unknown plant {name:?}: use one of {}", names.join(", "));
                return ExitCode::from(2);
            }
        },
    };
    let options = Options { nodes: args.node_count, fault_ms: args.fault_ms, plant, ..Options::default() };
    let replay = |seed: u64| {
        let mut command =
            format!("phalanx sim --seed {seed} --node-count {} --fault-ms {}", args.node_count, args.fault_ms);
        if let Some(plant) = plant {
            command.push_str(&format!(" --plant {}", plant.name()));
        }
        command
    };
    if let Some(seed) = args.seed {
        let started = Instant::now();
        let report = phalanx_sim::run(seed, &options);
        print!("{}", report.render());
        eprintln!("wall time {:.2} s", started.elapsed().as_secs_f64());
        return if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let started = Instant::now();
    let mut simulated_ms = 0;
    for (done, seed) in (args.first..args.first.saturating_add(args.seeds)).enumerate() {
        let report = phalanx_sim::run(seed, &options);
        simulated_ms += report.simulated_ms;
        if args.verbose {
            print!("{}", report.render());
        }
        if !report.ok() {
            if !args.verbose {
                print!("{}", report.render());
            }
            match plant {
                Some(plant) => {
                    println!("planted bug {} caught by seed {seed}, the {}. seed run", plant.name(), done + 1)
                }
                None => println!("seed {seed} failed"),
            }
            println!("replay: {}", replay(seed));
            eprint_rates(done as u64 + 1, simulated_ms, started);
            return ExitCode::FAILURE;
        }
    }
    match plant {
        Some(plant) => println!("planted bug {} NOT caught in {} seeds from {}", plant.name(), args.seeds, args.first),
        None => println!("{} seeds from {}: all invariants held", args.seeds, args.first),
    }
    eprint_rates(args.seeds, simulated_ms, started);
    ExitCode::SUCCESS
}

fn eprint_rates(seeds: u64, simulated_ms: u64, started: Instant) {
    let wall = started.elapsed().as_secs_f64();
    eprintln!(
        "{seeds} seed(s) in {wall:.1} s wall: {:.1} seeds per minute, {:.1} simulated seconds per wall second",
        seeds as f64 * 60.0 / wall,
        simulated_ms as f64 / 1000.0 / wall
    );
}
