#!/usr/bin/env bash
# What a tenant runs against its vTPM with tpm2-tools (TPM2TOOLS_TCTI points at its guest's bridge).
# Prints KEY=VALUE lines the test checks. Work files go to $1.
set -euo pipefail
# No resource manager between tpm2-tools and the vTPM (as with swtpm): flush what each step leaves.
flush() { tpm2_flushcontext -t; tpm2_flushcontext -s; }
w=$1
cd "$w"
tpm2_startup -c
echo "random=$(tpm2_getrandom 16 --hex)"
d1=$(printf 'stage-one' | sha256sum | cut -d' ' -f1)
d2=$(printf 'stage-two' | sha256sum | cut -d' ' -f1)
tpm2_pcrextend 16:sha256=$d1
tpm2_pcrextend 16:sha256=$d2
echo "pcr16=$(tpm2_pcrread sha256:16 | grep -o '0x[0-9A-F]*' | tail -1)"
tpm2_createprimary -Q -C o -g sha256 -G ecc -c primary.ctx
flush
tpm2_create -Q -C primary.ctx -G ecc -u key.pub -r key.priv
flush
tpm2_load -Q -C primary.ctx -u key.pub -r key.priv -c key.ctx
flush
echo "load=ok"
tpm2_createprimary -Q -C o -g sha256 -G ecc256:ecdsa-sha256:null -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign' -c ak.ctx
flush
tpm2_readpublic -Q -c ak.ctx -f pem -o ak.pem
tpm2_quote -Q -c ak.ctx -l sha256:16 -q abcdef0123 -m q.msg -s q.sig -o q.pcrs -g sha256
flush
tpm2_checkquote -Q -u ak.pem -m q.msg -s q.sig -f q.pcrs -g sha256 -q abcdef0123
echo "quote=verified"
tpm2_nvdefine -Q 0x1500016 -C o -s 32 -a 'ownerread|ownerwrite|authread|authwrite'
printf 'hello from %s' "$2" > nv.in
tpm2_nvwrite -Q 0x1500016 -C o -i nv.in
echo "nv=$(tpm2_nvread 0x1500016 -C o -s $(stat -c %s nv.in))"
tpm2_createpolicy -Q --policy-pcr -l sha256:16 -L pcr.policy
flush
printf 'disk-key-%s' "$2" > secret
tpm2_create -Q -C primary.ctx -L pcr.policy -i secret -u seal.pub -r seal.priv
flush
tpm2_load -Q -C primary.ctx -u seal.pub -r seal.priv -c seal.ctx
flush
echo "unsealed=$(tpm2_unseal -c seal.ctx -p pcr:sha256:16)"
flush
# A persistent key for the restart check.
tpm2_evictcontrol -Q -C o -c primary.ctx 0x81000016
flush
echo "done=1"
