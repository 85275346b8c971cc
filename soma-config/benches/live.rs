//! Live-config benchmarks.
//!
//! * `read/live_load`: one read of the current config (`live.load()` and a
//!   field), no writer.
//! * `contended/*`: the same read while one writer thread reloads
//!   continuously, for `Live` and for an `RwLock<Arc<T>>` baseline whose
//!   writer does the same work (load, validate, publish). The ratio is
//!   printed at the end.
//! * `reload/200_keys`: `Live::reload` of a 200-key TOML document plus
//!   environment, with a change every time (read, parse, merge, extract,
//!   strict check, validate, checksum, publish); the file write is not timed.
//!
//! Run: `cargo bench -p soma-config --bench live -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use soma_config::{ConfigUpdate, Live, Loader, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Section {
    url: String,
    pool_size: u32,
    connect_timeout_ms: u64,
    request_timeout_ms: u64,
    retries: u32,
    enabled: bool,
    name: String,
    batch_size: u32,
    ratio: f64,
    password: Secret,
}

impl Default for Section {
    fn default() -> Self {
        Self {
            url: "tcp://127.0.0.1:1".into(),
            pool_size: 8,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 2_000,
            retries: 3,
            enabled: true,
            name: "default".into(),
            batch_size: 100,
            ratio: 0.5,
            password: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Big {
    service_name: String,
    sections: BTreeMap<String, Section>,
}

/// 20 sections x 10 keys = 200 keys.
fn toml_200(n: u64) -> String {
    let mut s = String::from("service_name = \"bench\"\n");
    for i in 0..20 {
        s.push_str(&format!(
            "[sections.s{i:02}]\nurl = \"tcp://host-{i}:{port}\"\npool_size = {ps}\nconnect_timeout_ms = 1000\nrequest_timeout_ms = {n}\nretries = 3\nenabled = true\nname = \"section {i}\"\nbatch_size = 500\nratio = 0.25\npassword = \"pw-{i}\"\n",
            port = 1000 + i,
            ps = 4 + i,
        ));
    }
    s
}

fn loader(path: &std::path::Path) -> Loader<Big> {
    Loader::<Big>::new()
        .env_from([("SOMA_SERVICE_NAME", "bench-env")])
        .file(path)
        .strict(true)
        .validate(|b, c| {
            for (name, s) in &b.sections {
                c.ensure(
                    s.pool_size > 0,
                    format!("sections.{name}.pool_size"),
                    "must be at least 1",
                );
            }
        })
}

/// Update versions across all writer runs (they must keep increasing).
static UPDATE_VERSION: AtomicU64 = AtomicU64::new(1);

struct Writer {
    stop: Arc<AtomicBool>,
    publishes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn spawn(mut work: impl FnMut(u64) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let publishes = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), publishes.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                work(n);
                p.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            publishes,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.publishes.load(Ordering::Relaxed)
    }
}

fn live_writer(live: Live<Big>) -> Writer {
    // A continuous stream of remote updates: each is a full load (files,
    // env, update layer), strict check, validation, checksum and publish.
    Writer::spawn(move |n| {
        let version = UPDATE_VERSION.fetch_add(1, Ordering::Relaxed);
        let doc = serde_json::json!({"sections": {"s00": {"retries": n}}});
        live.apply(&ConfigUpdate::new(version, doc))
            .expect("update applies");
    })
}

fn rwlock_writer(lock: Arc<RwLock<Arc<Big>>>, loader: Loader<Big>) -> Writer {
    // The same work, published through the lock.
    Writer::spawn(move |n| {
        let mut next = loader.load().expect("loads");
        next.sections.get_mut("s00").unwrap().retries = n as u32;
        *lock.write().unwrap() = Arc::new(next);
    })
}

#[inline(never)]
fn read_live(live: &Live<Big>) -> u32 {
    let cur = live.load();
    cur.service_name.len() as u32
}

#[inline(never)]
fn read_reader(reader: &mut soma_config::Reader<Big>) -> u32 {
    reader.load().service_name.len() as u32
}

#[inline(never)]
fn read_rwlock(lock: &RwLock<Arc<Big>>) -> u32 {
    let cur = lock.read().unwrap();
    cur.service_name.len() as u32
}

/// The usual reason for the `Arc` in `RwLock<Arc<T>>`: a facade's
/// `current() -> Arc<T>` takes a snapshot (clone under the read lock) so the
/// caller holds no lock while it uses the config — what `Reader::load`
/// gives a caller too.
#[inline(never)]
fn read_rwlock_snapshot(lock: &RwLock<Arc<Big>>) -> u32 {
    let cur: Arc<Big> = lock.read().unwrap().clone();
    cur.service_name.len() as u32
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.toml");
    std::fs::write(&path, toml_200(1)).unwrap();
    (dir, path)
}

fn bench(c: &mut Criterion) {
    let (_dir, path) = setup();
    let live = loader(&path).into_live().unwrap();
    assert_eq!(live.load().sections.len(), 20);

    c.bench_function("read/live_load", |b| {
        b.iter(|| black_box(read_live(black_box(&live))))
    });
    let mut reader = live.reader();
    c.bench_function("read/reader_load", |b| {
        b.iter(|| black_box(read_reader(black_box(&mut reader))))
    });

    let mut group = c.benchmark_group("contended");
    let writer = live_writer(live.clone());
    group.bench_function("live_load_with_writer", |b| {
        b.iter(|| black_box(read_live(black_box(&live))))
    });
    group.bench_function("reader_load_with_writer", |b| {
        b.iter(|| black_box(read_reader(black_box(&mut reader))))
    });
    let live_publishes = writer.finish();

    let lock = Arc::new(RwLock::new(Arc::new(loader(&path).load().unwrap())));
    let writer = rwlock_writer(lock.clone(), loader(&path));
    group.bench_function("rwlock_read_with_writer", |b| {
        b.iter(|| black_box(read_rwlock(black_box(&lock))))
    });
    group.bench_function("rwlock_snapshot_with_writer", |b| {
        b.iter(|| black_box(read_rwlock_snapshot(black_box(&lock))))
    });
    let rw_publishes = writer.finish();
    group.finish();

    // The ratio, measured here with one clock and equal read counts.
    println!(
        "\n(writer publishes during the criterion phase: live {live_publishes}, rwlock {rw_publishes})"
    );
    for bg_readers in [0, 1] {
        let (reader_ns, live_ns, rw_ns, snap_ns) = ratio_run(&live, &lock, &path, bg_readers);
        println!(
            "RATIO one writer reloading continuously, {} reader thread(s): \
             Live::reader().load() {reader_ns:.2} ns/read, Live::load() {live_ns:.2} ns/read, \
             RwLock<Arc<T>> guard read {rw_ns:.2} ns/read, RwLock<Arc<T>> snapshot (read().clone()) {snap_ns:.2} ns/read \
             => Reader {:.1}x faster than the guard read, {:.1}x faster than the snapshot; Live::load {:.1}x / {:.1}x",
            bg_readers + 1,
            rw_ns / reader_ns,
            snap_ns / reader_ns,
            rw_ns / live_ns,
            snap_ns / live_ns
        );
    }
    println!();

    let reload_live = loader(&path).into_live().unwrap();
    let mut n = 1;
    c.bench_function("reload/200_keys", |b| {
        // The file edit is setup (not timed); the reload reads it back.
        b.iter_batched(
            || {
                n += 1;
                std::fs::write(&path, toml_200(n)).unwrap();
            },
            |()| {
                let change = reload_live.reload().unwrap();
                assert!(matches!(change, soma_config::Change::Updated { .. }));
                black_box(change)
            },
            criterion::BatchSize::PerIteration,
        )
    });
}

/// Mean ns per read on this thread, while `bg_readers` other threads run
/// `read_bg` in a loop and a writer reloads continuously.
fn timed_reads(
    bg_readers: usize,
    read_bg: impl Fn() + Send + Sync + 'static,
    mut read: impl FnMut(),
) -> f64 {
    const READS: u64 = 2_000_000;
    let stop = Arc::new(AtomicBool::new(false));
    let read_bg = Arc::new(read_bg);
    let threads: Vec<_> = (0..bg_readers)
        .map(|_| {
            let (stop, read_bg) = (stop.clone(), read_bg.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1_000 {
                        read_bg();
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for _ in 0..READS {
        read();
    }
    let ns = start.elapsed().as_nanos() as f64 / READS as f64;
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    ns
}

/// Best of three runs of each design under a running writer, with
/// `bg_readers` extra reader threads: (Reader, Live::load, RwLock guard
/// read, RwLock snapshot) ns/read.
fn ratio_run(
    live: &Live<Big>,
    lock: &Arc<RwLock<Arc<Big>>>,
    path: &std::path::Path,
    bg_readers: usize,
) -> (f64, f64, f64, f64) {
    let mut best = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        let w = live_writer(live.clone());
        let bg = std::sync::Mutex::new(live.reader());
        let mut reader = live.reader();
        let reader_ns = timed_reads(
            bg_readers,
            {
                let live = live.clone();
                move || {
                    thread_local_reader(&live);
                }
            },
            || {
                black_box(read_reader(black_box(&mut reader)));
            },
        );
        drop(bg);
        w.finish();

        let w = live_writer(live.clone());
        let bg_live = live.clone();
        let live_ns = timed_reads(
            bg_readers,
            move || {
                black_box(read_live(&bg_live));
            },
            || {
                black_box(read_live(black_box(live)));
            },
        );
        w.finish();

        let w = rwlock_writer(lock.clone(), loader(path));
        let bg_lock = lock.clone();
        let rw_ns = timed_reads(
            bg_readers,
            move || {
                black_box(read_rwlock(&bg_lock));
            },
            || {
                black_box(read_rwlock(black_box(lock)));
            },
        );
        w.finish();

        let w = rwlock_writer(lock.clone(), loader(path));
        let bg_lock = lock.clone();
        let snap_ns = timed_reads(
            bg_readers,
            move || {
                black_box(read_rwlock_snapshot(&bg_lock));
            },
            || {
                black_box(read_rwlock_snapshot(black_box(lock)));
            },
        );
        w.finish();
        best = (
            best.0.min(reader_ns),
            best.1.min(live_ns),
            best.2.min(rw_ns),
            best.3.min(snap_ns),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    best
}

/// A background reader thread's own cached `Reader` (one per thread).
fn thread_local_reader(live: &Live<Big>) {
    thread_local! {
        static READER: std::cell::RefCell<Option<soma_config::Reader<Big>>> = const { std::cell::RefCell::new(None) };
    }
    READER.with(|r| {
        let mut r = r.borrow_mut();
        let reader = r.get_or_insert_with(|| live.reader());
        black_box(read_reader(reader));
    });
}

#[allow(missing_docs)]
mod harness {
    use super::*;
    criterion_group!(benches, bench);
}
criterion_main!(harness::benches);
