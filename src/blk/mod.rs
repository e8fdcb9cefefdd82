//! virtio-blk request logic: parse descriptor chains from guest memory, execute them on the image
//! engine, write the status. Knows virtio-queue and vm-memory; knows nothing of vhost-user sockets.
//!
//! API CONTRACT (skeleton, filled in by issue #5):
//! - `BlkDevice::new(image: Arc<Image>, cfg: BlkConfig) -> BlkDevice`
//! - `BlkDevice::features(&self) -> u64`: virtio device feature bits offered (VERSION_1,
//!   SIZE_MAX, SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH, MQ, RO, DISCARD, WRITE_ZEROES, EVENT_IDX,
//!   INDIRECT_DESC).
//! - `BlkDevice::config_space(&self) -> Vec<u8>`: `struct virtio_blk_config`, little-endian.
//! - `BlkDevice::process_chain<M>(&self, chain: DescriptorChain<M>, ...) -> u32`: executes one
//!   request; returns the used length. Never panics on guest input.
