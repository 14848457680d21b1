//! The redb storage against openraft's own storage test suite. Durability
//! across a real SIGKILL (snapshot plus log replay) is tested with real
//! processes in `crates/phalanx-cli/tests/crash.rs`.

use openraft::testing::{StoreBuilder, Suite};
use phalanx_server::raft_types::{StorageError, TypeConfig};
use phalanx_server::store::{self, LogStore, StateMachineStore};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, state_machine) = store::open(dir.path()).expect("open store");
        Ok((dir, log, state_machine))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft's storage suite passes");
}
