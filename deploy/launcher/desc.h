/* A deployment description (the JSON file deploy/launch reads): hosts, instances, proxy, network
 * and secrets; its checks (placement against GPUs per host, port clashes, the model's heads and
 * experts) and the plan made from it: one mpirun command per instance and the proxy command.
 * No I/O here: the caller reads the files and runs the commands (deploy/launcher/launch.c).
 * One thread at a time; every error is one line in err naming where in the file it is. */
#ifndef DUET_DL_DESC_H
#define DUET_DL_DESC_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"

typedef enum dl_role {
    DL_ROLE_PREFILL = 0,
    DL_ROLE_DECODE = 1,
} dl_role;

typedef struct dl_host {
    const char *name;    /* what mpirun's --host and the launch agent use */
    const char *address; /* what the proxy and decode workers connect to (default: name) */
    const char *listen;  /* what its workers' HTTP servers bind (default: 0.0.0.0) */
    int gpus;            /* devices (or, on the CPU backend, rank slots) */
} dl_host;

typedef struct dl_instance {
    const char *name;
    dl_role role;
    int dp, tp;
    bool ep;
    int port;    /* HTTP of DP rank 0; DP rank r serves port + r on the host running it */
    int kv_port; /* prefill side channel of DP rank 0 (+ r); 0: port + 1000, the worker's default */
    int *hosts;  /* [n_hosts] indices into dl_desc.hosts; ranks split evenly, in this order */
    int n_hosts;
    const char **args; /* [n_args] extra worker flags */
    int n_args;
} dl_instance;

typedef struct dl_desc {
    const char *model, *tokenizer, *served_name, *backend;
    const char *bin;   /* folder with duet-prefill, duet-decode, duet-proxy; NULL: the caller's */
    const char *nic;   /* IP interface: NCCL_SOCKET_IFNAME, MPI's TCP, UCX_NET_DEVICES */
    const char **rdma; /* [n_rdma] UCX/NCCL devices ("mlx5_0:1"): UCX_NET_DEVICES, NCCL_IB_HCA */
    int n_rdma;
    const char *kv_secret_env;            /* environment variable holding the KV secret */
    const char *api_key_env;              /* ... the API key; NULL: none */
    const char **env_names, **env_values; /* [n_env] exported to every rank */
    int n_env;
    const char **mpirun_args, **worker_args;
    int n_mpirun_args, n_worker_args;
    dl_host *hosts;
    int n_hosts;
    dl_instance *inst;
    int n_inst;
    bool has_proxy;
    int proxy_port;
    const char *proxy_listen;
    int proxy_host; /* index of the host the proxy runs on (for port checks), -1: none given */
    const char **proxy_args;
    int n_proxy_args;
    void *priv; /* the parsed JSON every string above points into */
} dl_desc;

/* Parses and checks a description (JSON; // and block comments allowed). Checks everything
 * that needs no model: names, roles, sizes, placement against each host's GPUs, ports. On
 * error nothing is returned and err holds one line. */
duet_status dl_desc_parse(const char *text, size_t len, dl_desc **desc_p, char *err,
                          size_t err_len);
void dl_desc_destroy(dl_desc *d);

/* The model dimensions the parallel layout must divide (from config.json). */
typedef struct dl_model_shape {
    int heads, intermediate, moe_intermediate, shared_experts, routed_experts;
} dl_model_shape;

/* Checks every instance's TP against the heads and MLP sizes and its EP size against the
 * routed experts, the way the workers will; config names the file in the message. */
duet_status dl_desc_check_model(const dl_desc *d, const dl_model_shape *m, const char *config,
                                char *err, size_t err_len);

/* One process the launcher starts. */
typedef struct dl_cmd {
    char *name;    /* instance name, or "proxy" */
    char *summary; /* one line: layout, hosts, endpoints */
    char **argv;   /* NULL-terminated */
    char **env;    /* NAME=VALUE to set for this process only, NULL-terminated; a VALUE of
                    * "$VAR" means the launcher's own VAR */
    int instance;  /* index into dl_desc.inst, -1 for the proxy */
} dl_cmd;

typedef struct dl_endpoint {
    char *host_port; /* "address:port" */
    int instance;
    dl_role role;
} dl_endpoint;

typedef struct dl_plan {
    dl_cmd *cmds;
    int n_cmds;
    dl_endpoint *endpoints; /* every DP rank's HTTP endpoint, in instance order */
    int n_endpoints;
    char *proxy_url; /* where the proxy answers from this machine, NULL without one */
} dl_plan;

/* Where the programs live when the description gives no "bin". */
typedef struct dl_paths {
    const char *prefill, *decode, *proxy;
    const char *agent; /* the launch agent for instances that outlive a lost host */
} dl_paths;

/* Makes the commands. bin_paths is used when d->bin is NULL; with d->bin the programs are
 * bin/duet-prefill, bin/duet-decode, bin/duet-proxy and bin/duet-mpi-agent. */
duet_status dl_plan_create(const dl_desc *d, const dl_paths *bin_paths, dl_plan **plan_p);
void dl_plan_destroy(dl_plan *p);

/* The command as text a POSIX shell runs the same way (env first, long ones continued over
 * lines with backslashes); the caller frees it. */
char *dl_cmd_line(const dl_cmd *c);

#endif
