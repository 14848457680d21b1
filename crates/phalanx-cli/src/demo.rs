//! placeholder
#[derive(clap::Args)]
pub struct DemoArgs {}
pub async fn run(_: DemoArgs) -> anyhow::Result<()> { anyhow::bail!("todo") }
