//! Hostile guest over the real vhost-user socket (issue #5 item 4, shared/hostile-guest.md).
mod frontend;
mod support;

use frontend::*;
use support::*;

#[test]
fn smoke_round_trip() {
    let work = Workdir::new();
    let backend = Backend::start(&work, ServeOptions::default());
    let mut dev = Device::connect(&backend.socket(), &ConnectOptions::default()).unwrap();
    let data = pattern(1, 8192);
    assert_eq!(dev.write(0, 8, &data).unwrap(), VIRTIO_BLK_S_OK);
    let (st, back) = dev.read(1, 8, 8192).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(back, data);
    dev.gm.check_untouched().unwrap();
    drop(backend);
}
