/* A program the verifier must refuse (it reads past the packet without a bounds
 * check): netd's tests load it to check that a load failure names the program
 * and carries the verifier's reason. Never attached. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

SEC("classifier")
int grove_bad(struct __sk_buff *skb)
{
	__u8 *data = (__u8 *)(long)skb->data;
	return data[20] == 1 ? TC_ACT_SHOT : TC_ACT_OK;
}
