//! What sealing costs per value: one 44-character base64 key (what a registration's hub upsert seals twice
//! and an individual enrollment's context load opens twice).
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use dps_seal::{DataKey, Sealer};

fn seal(c: &mut Criterion) {
    let sealer = Sealer::new(vec![("dk-1".into(), DataKey::from_bytes([1u8; 32]))], "dk-1").unwrap();
    let key = "cHJpbWFyeS1zZWNyZXQta2V5LTAxMjM0NTY3ODlhYmM=";
    let context = ["hub_devices", "hub-1.localhost", "device-000123", "primary_key"];
    let sealed = sealer.seal_str(&context, key).unwrap();
    let mut g = c.benchmark_group("seal");
    g.bench_function("seal_key", |b| {
        b.iter(|| black_box(sealer.seal_str(&context, black_box(key)).unwrap()))
    });
    g.bench_function("open_key", |b| {
        b.iter(|| black_box(sealer.open_str(&context, black_box(&sealed)).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = seal
}
criterion_main!(benches);
