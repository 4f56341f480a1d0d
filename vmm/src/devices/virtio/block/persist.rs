//! virtio-blk's saved state: the common virtio state (features, activation, live queues) and
//! the disk's frozen layer chain ([`DiskState`]). The counters start again at zero.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::device::Block;
use super::disk::{Disk, DiskError, DiskState};
use crate::devices::virtio::queues::{restore_common, QueuesError};
use crate::devices::virtio::{IrqTrigger, VirtioDevice, VirtioState};
use crate::memory::GuestRam;
use crate::persist::Persist;

/// Errors saving or restoring a virtio-blk.
#[derive(Debug, thiserror::Error)]
pub enum BlockPersistError {
    /// The disk (its chain cannot be saved, opened, or given a new layer).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The queue eventfd cannot be created.
    #[error("cannot create the queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The saved queues.
    #[error(transparent)]
    Queues(#[from] QueuesError),
}

/// virtio-blk's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// Common virtio state.
    pub virtio: VirtioState,
    /// The disk.
    pub disk: DiskState,
}

/// What restoring a virtio-blk needs.
pub struct BlockArgs {
    /// Guest memory.
    pub mem: Arc<GuestRam>,
    /// Its interrupt (used when the saved device was activated).
    pub interrupt: Arc<IrqTrigger>,
    /// The snapshot directory the disk's layer paths are relative to.
    pub snapshot_dir: PathBuf,
    /// Where a writable disk's new layer goes (`DIR/<id>.data`, `.idx`).
    pub disk_dir: Option<PathBuf>,
}

impl Persist for Block {
    type State = BlockState;
    type Args = BlockArgs;
    type Error = BlockPersistError;

    fn save(&self) -> Result<BlockState, BlockPersistError> {
        Ok(BlockState { virtio: self.q.save(self.acked_features()), disk: self.disk().save()? })
    }

    fn restore(args: BlockArgs, s: &BlockState) -> Result<Self, BlockPersistError> {
        let disk = Disk::restore(&s.disk, &args.snapshot_dir, args.disk_dir.as_deref())?;
        let mut b = Block::new(args.mem, disk).map_err(BlockPersistError::EventFd)?;
        restore_common(&mut b, &s.virtio, args.interrupt)?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::super::device::tests::{bytes, device, fill, hdr, pat, r, w, MIB};
    use super::super::QUEUE_SIZE;
    use super::*;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

    fn irq() -> Arc<IrqTrigger> {
        Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0))
    }

    /// Links three descriptors placed at table index `at`.
    fn three(d: [RawDescriptor; 3], at: u16) -> Vec<RawDescriptor> {
        d.iter()
            .enumerate()
            .map(|(i, x)| {
                let s = Descriptor::from(*x);
                let (f, n) = if i < 2 {
                    (s.flags() | VRING_DESC_F_NEXT as u16, at + i as u16 + 1)
                } else {
                    (s.flags(), 0)
                };
                RawDescriptor::from(Descriptor::new(s.addr().0, s.len(), f, n))
            })
            .collect()
    }

    #[test]
    fn an_activated_disk_round_trips_and_serves_on_its_own_layer() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let (ram, mut a) = device(&root, false);
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), QUEUE_SIZE);
        // The driver writes 4 KiB of 7s at sector 16.
        fill(&ram, 4 * MIB, 4096, 7);
        let out =
            three([hdr(&ram, 2 * MIB, VIRTIO_BLK_T_OUT, 16), r(4 * MIB, 4096), w(3 * MIB, 1)], 0);
        mq.add_desc_chains(&out, 0).unwrap();
        a.set_acked_features(VIRTIO_F_VERSION_1);
        a.activate(vec![mq.create_queue().unwrap()], irq()).unwrap();
        a.process_queue();
        assert_eq!(bytes(&ram, 3 * MIB, 1), vec![0]);
        // Not savable until the layer is frozen into a snapshot directory.
        assert!(matches!(a.save(), Err(BlockPersistError::Disk(DiskError::NotFrozen(_)))));
        let snap = root.join("snap");
        std::fs::create_dir(&snap).unwrap();
        a.disk_mut().prepare_snapshot(&snap).unwrap();
        a.disk_mut().freeze(&snap, true).unwrap();
        let saved = a.save().unwrap();
        assert!(saved.virtio.activated);
        assert_eq!(saved.virtio.queues[0].next_avail, 1);
        assert_eq!(saved.disk.layers.len(), 2, "the frozen layer over the image");
        // Through the state file's JSON and back.
        let saved: BlockState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let child = root.join("child");
        std::fs::create_dir(&child).unwrap();
        let args = |dir: Option<std::path::PathBuf>| BlockArgs {
            mem: ram.clone(),
            interrupt: irq(),
            snapshot_dir: snap.clone(),
            disk_dir: dir,
        };
        let mut b = Block::restore(args(Some(child.clone())), &saved).unwrap();
        assert_eq!(b.save().unwrap(), saved, "save(restore(s)) == s");
        assert!(child.join("root.data").exists(), "the child's own layer");
        // The restored device continues where the saved one stopped: the next chain reads
        // the data written before the snapshot.
        fill(&ram, 5 * MIB, 8192, 0xee);
        let rd = three(
            [hdr(&ram, 2 * MIB + 64, VIRTIO_BLK_T_IN, 15), w(5 * MIB, 8192), w(3 * MIB + 1, 1)],
            3,
        );
        mq.add_desc_chains(&rd, 3).unwrap();
        assert!(b.process_queue());
        assert_eq!(mq.used().idx().load(), 2);
        assert_eq!(bytes(&ram, 3 * MIB + 1, 1), vec![0]);
        let got = bytes(&ram, 5 * MIB, 8192);
        assert_eq!(&got[..512], &(15 * 512..16 * 512).map(pat).collect::<Vec<_>>()[..]);
        assert_eq!(&got[512..4608], &[7; 4096][..]);
        // A writable disk needs a disk dir; a bad saved queue or chain is refused.
        assert!(Block::restore(args(None), &saved).is_err());
        let mut bad = saved.clone();
        bad.virtio.queues.clear();
        assert!(matches!(
            Block::restore(args(Some(root.join("x"))), &bad),
            Err(BlockPersistError::Disk(_) | BlockPersistError::Queues(_))
        ));
        let mut bad = saved;
        bad.disk.layers[0].data = "nonexistent.data".into();
        assert!(matches!(
            Block::restore(args(Some(root.join("y"))), &bad),
            Err(BlockPersistError::Disk(_))
        ));
    }
}
