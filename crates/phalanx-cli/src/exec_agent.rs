//! placeholder
#[derive(clap::Args)]
pub struct ExecAgentArgs {}
pub async fn run(_: ExecAgentArgs) -> anyhow::Result<()> { anyhow::bail!("todo") }
