//! placeholder
use crate::Connect;
#[derive(clap::Subcommand)]
pub enum TaskCommand { Get { id: u64 } }
pub async fn run_task(_: &Connect, _: TaskCommand) -> anyhow::Result<()> { anyhow::bail!("todo") }
pub async fn status(_: &Connect) -> anyhow::Result<()> { anyhow::bail!("todo") }
