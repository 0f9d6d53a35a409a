//! cgroup v2 figures read in the guest, as the `io.containerd.cgroups.v2.Metrics`
//! containerd's CRI plugin (and `ctr task metrics`) understand.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use proto::agent::Stats;

/// Sums the stats of one or more containers (a pod's sandbox reports all
/// of its containers together).
pub fn metrics(all: &[Stats]) -> Metrics {
    let mut cpu = CPUStat::default();
    let mut memory = MemoryStat::default();
    let mut events = MemoryEvents::default();
    let mut pids = PidsStat::default();
    for s in all {
        cpu.usage_usec += s.cpu_usage_usec;
        cpu.user_usec += s.cpu_user_usec;
        cpu.system_usec += s.cpu_system_usec;
        cpu.nr_periods += s.cpu_nr_periods;
        cpu.nr_throttled += s.cpu_nr_throttled;
        cpu.throttled_usec += s.cpu_throttled_usec;
        memory.usage += s.memory_current;
        memory.usage_limit += s.memory_limit;
        for e in &s.memory_stat {
            if let Some(field) = memory_field(&mut memory, &e.key) {
                *field += e.value;
            }
        }
        events.oom += s.oom_events;
        events.oom_kill += s.oom_kill_events;
        pids.current += s.pids_current;
        pids.limit += s.pids_limit;
    }
    Metrics {
        cpu: MessageField::some(cpu),
        memory: MessageField::some(memory),
        memory_events: MessageField::some(events),
        pids: MessageField::some(pids),
        ..Default::default()
    }
}

/// `metrics` as the `Any` of a Stats response. containerd resolves the type
/// by its bare full name (typeurl), not by the `type.googleapis.com/` form
/// `Any::pack` writes: ctr and the CRI plugin could not decode that one.
pub fn encode(metrics: &Metrics) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    Ok(Any {
        type_url: metrics.descriptor_dyn().full_name().to_string(),
        value: metrics.write_to_bytes()?,
        ..Default::default()
    })
}

/// The `MemoryStat` field for a `memory.stat` key.
fn memory_field<'a>(m: &'a mut MemoryStat, key: &str) -> Option<&'a mut u64> {
    Some(match key {
        "anon" => &mut m.anon,
        "file" => &mut m.file,
        "kernel_stack" => &mut m.kernel_stack,
        "slab" => &mut m.slab,
        "sock" => &mut m.sock,
        "shmem" => &mut m.shmem,
        "file_mapped" => &mut m.file_mapped,
        "file_dirty" => &mut m.file_dirty,
        "file_writeback" => &mut m.file_writeback,
        "anon_thp" => &mut m.anon_thp,
        "inactive_anon" => &mut m.inactive_anon,
        "active_anon" => &mut m.active_anon,
        "inactive_file" => &mut m.inactive_file,
        "active_file" => &mut m.active_file,
        "unevictable" => &mut m.unevictable,
        "slab_reclaimable" => &mut m.slab_reclaimable,
        "slab_unreclaimable" => &mut m.slab_unreclaimable,
        "pgfault" => &mut m.pgfault,
        "pgmajfault" => &mut m.pgmajfault,
        "workingset_refault" => &mut m.workingset_refault,
        "workingset_activate" => &mut m.workingset_activate,
        "workingset_nodereclaim" => &mut m.workingset_nodereclaim,
        "pgrefill" => &mut m.pgrefill,
        "pgscan" => &mut m.pgscan,
        "pgsteal" => &mut m.pgsteal,
        "pgactivate" => &mut m.pgactivate,
        "pgdeactivate" => &mut m.pgdeactivate,
        "pglazyfree" => &mut m.pglazyfree,
        "pglazyfreed" => &mut m.pglazyfreed,
        "thp_fault_alloc" => &mut m.thp_fault_alloc,
        "thp_collapse_alloc" => &mut m.thp_collapse_alloc,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::StatEntry;

    #[test]
    fn stats_map_and_sum() {
        let one = Stats {
            cpu_usage_usec: 100,
            cpu_user_usec: 60,
            cpu_system_usec: 40,
            memory_current: 1 << 20,
            memory_limit: 64 << 20,
            memory_stat: vec![
                StatEntry {
                    key: "anon".into(),
                    value: 4096,
                },
                StatEntry {
                    key: "not_a_field".into(),
                    value: 1,
                },
            ],
            oom_kill_events: 1,
            pids_current: 3,
            ..Default::default()
        };
        let m = metrics(&[one.clone(), one]);
        assert_eq!(m.cpu.usage_usec, 200);
        assert_eq!(m.cpu.user_usec, 120);
        assert_eq!(m.memory.usage, 2 << 20);
        assert_eq!(m.memory.usage_limit, 128 << 20);
        assert_eq!(m.memory.anon, 8192);
        assert_eq!(m.memory_events.oom_kill, 2);
        assert_eq!(m.pids.current, 6);
        let any = encode(&m).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap(), m);
    }
}
