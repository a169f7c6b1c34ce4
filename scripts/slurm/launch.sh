#!/bin/bash
# Launch a megaquant entry point inside a Slurm allocation. The sbatch templates beside this file
# call it as:   bash scripts/slurm/launch.sh ENTRY [HYDRA_OVERRIDES...]
# You normally edit the templates, not this file.
#
# Two ways to start the processes (LAUNCHER):
#   srun      one Slurm task per GPU. Each process finds its place from SLURM_PROCID, SLURM_NTASKS,
#             SLURM_LOCALID and the first host of SLURM_JOB_NODELIST (megaquant.megatron.dist).
#             The job's --ntasks-per-node must equal its GPUs per node.
#   torchrun  one Slurm task per node, each running torchrun with NPROC_PER_NODE workers; the nodes
#             meet through a c10d rendezvous on the first node. torchrun's RANK/WORLD_SIZE take
#             precedence over the SLURM_* variables in the workers. Use --ntasks-per-node=1.
#
# Environment it reads (all optional):
#   LAUNCHER         srun | torchrun                              (default: srun)
#   NPROC_PER_NODE   torchrun workers per node       (default: GPUs on the node, else 1)
#   OUT_DIR          run.output_dir given to the entry point  (default: outputs/slurm/<name>-<jobid>)
#   CONTAINER_IMAGE  run inside this image with pyxis (srun --container-image); empty: on the host
#   MASTER_PORT      rendezvous port                 (default: 20000 + job id % 20000)
#
# Failure handling: srun --kill-on-bad-exit=1 ends every task as soon as one exits non-zero, so a
# crashed rank fails the whole job instead of leaving the others blocked in a collective. A rank
# that hangs rather than crashes is caught by the collective timeout (Hydra override
# run.timeout_s=SECONDS): the waiting ranks raise, exit non-zero, and srun kills the rest.
set -euo pipefail

entry=${1:?usage: launch.sh ENTRY [HYDRA_OVERRIDES...]}
shift
: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm job: submit a template with sbatch}"

# Run from the directory sbatch was called in (the repo root): sbatch runs a *copy* of the
# template from Slurm's spool directory, so paths relative to the script itself would be wrong.
cd "${SLURM_SUBMIT_DIR}"
python=python
[[ -x .venv/bin/python ]] && python="$PWD/.venv/bin/python"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One intra-op thread per CPU given to the task; torch would otherwise start one per core of the
# node in every rank and oversubscribe it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

launcher=${LAUNCHER:-srun}
out_dir=${OUT_DIR:-outputs/slurm/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
mkdir -p "$out_dir"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR="${MASTER_ADDR:-$head_node}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

srun_args=(--kill-on-bad-exit=1 --nodes="$num_nodes")
# Slurm 22.05 does not hand the job's --cpus-per-task to srun steps (23.11 does again): pass it.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$PWD:$PWD"
                --container-workdir="$PWD")
fi
# The entry point's own overrides come first so that the user's (later) ones win in Hydra.
overrides=("run.output_dir=$out_dir" "$@")

echo "megaquant: job $SLURM_JOB_ID, $launcher launch of $entry on $num_nodes node(s)" \
     "($SLURM_JOB_NODELIST), rendezvous $MASTER_ADDR:$MASTER_PORT, output $out_dir"
case "$launcher" in
    srun)
        exec srun "${srun_args[@]}" --ntasks="${SLURM_NTASKS:?}" \
            "$python" "$entry" "${overrides[@]}"
        ;;
    torchrun)
        gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
        nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
        echo "megaquant: torchrun with $nproc worker(s) per node"
        # --max-restarts=0: a failed worker fails its node's torchrun, and srun then fails the job.
        exec srun "${srun_args[@]}" --ntasks="$num_nodes" --ntasks-per-node=1 \
            "$python" -m torch.distributed.run \
            --nnodes="$num_nodes" --nproc-per-node="$nproc" --max-restarts=0 \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
            --rdzv-id="$SLURM_JOB_ID" \
            "$entry" "${overrides[@]}"
        ;;
    *)
        echo "launch.sh: LAUNCHER must be 'srun' or 'torchrun', got '$launcher'" >&2
        exit 2
        ;;
esac
