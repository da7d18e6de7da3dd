// Changed Block Tracking and snapshots that freeze what they saw, which govmomi 0.24's
// simulator lacks. The front end sits before the simulator's /sdk handler:
//
//   - CreateSnapshot_Task: after the simulator made the snapshot, each disk's flat file is
//     copied to a file of the snapshot's own, which the snapshot's config names (as a real
//     snapshot keeps the base disk while the VM writes a delta), and, when the VM has
//     changeTrackingEnabled, gets a change id "52 <epoch>/<n>" whose per-block digests
//     are kept.
//   - QueryChangedDiskAreas: the blocks whose digest differs between the state of the
//     given change id and the snapshot's ("*": every block holding data), a page of at
//     most pageSpan bytes from startOffset, as vSphere pages it.
//   - ReconfigVM_Task turning changeTrackingEnabled off: a new epoch, every older change
//     id unknown (a CBT reset).
//   - RemoveSnapshot_Task: the snapshot's frozen files go.
//   - a quiesced CreateSnapshot_Task of a VM whose annotation says "tools: not running"
//     fails with ToolsUnavailable, as vSphere's does without VMware Tools.
//   - /folder/<path>?dsName=<datastore>: the datastore's files over HTTP (GET and HEAD,
//     with Range), as vCenter serves them, for a live session's cookie only: the
//     simulator's own handler checks no session.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"hash/maphash"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	noToolsMark   = "tools: not running" // in a VM's annotation: quiesced snapshots fail
	sessionCookie = "vmware_soap_session"
	blockSize     = 64 * 1024
	pageSpan      = 256 * 1024 * 1024 // what one QueryChangedDiskAreas answer covers at most
)

type diskTrack struct {
	epoch  string
	seq    int
	states map[string][]uint64 // change id -> digest of every block (0: all zeros)
}

type frontEnd struct {
	next   http.Handler
	stores map[string]string // datastore name -> directory
	mu     sync.Mutex
	disks  map[string]*diskTrack // "<vm moid>:<device key>"
	frozen map[string][]string   // snapshot moid -> its frozen files
	live   map[string]time.Time  // session cookie -> when the simulator last confirmed it
	// traceFolder: log every datastore read with its range, for tests that count them.
	traceFolder bool
}

func newFrontEnd(next http.Handler, stores map[string]string) *frontEnd {
	return &frontEnd{next: next, stores: stores, disks: map[string]*diskTrack{},
		frozen: map[string][]string{}, live: map[string]time.Time{}}
}

func newEpoch() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// path of "[store] dir/file.vmdk"'s data file ("-flat.vmdk") on this machine.
func (f *frontEnd) flatPath(fileName string) (string, error) {
	end := strings.Index(fileName, "] ")
	if !strings.HasPrefix(fileName, "[") || end < 0 {
		return "", fmt.Errorf("not a datastore path: %q", fileName)
	}
	dir, ok := f.stores[fileName[1:end]]
	if !ok {
		return "", fmt.Errorf("unknown datastore in %q", fileName)
	}
	rel := strings.TrimSuffix(fileName[end+2:], ".vmdk") + "-flat.vmdk"
	return filepath.Join(dir, rel), nil
}

// digestSeed: block digests are compared within this process only.
var digestSeed = maphash.MakeSeed()

// freezeFile copies the disk's data file as the snapshot's own (holes stay holes, and it
// gets the disk's full size, as a flat extent has) and returns the digest of every
// 64 KiB block of it (0: all zeros), in one pass over the source.
func freezeFile(src, dst string, capacity int64) ([]uint64, error) {
	in, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	info, err := in.Stat()
	if err != nil {
		return nil, err
	}
	size := capacity
	if info.Size() > size {
		size = info.Size()
	}
	sums := make([]uint64, (capacity+blockSize-1)/blockSize)
	const span = 64 * blockSize
	buf := make([]byte, span)
	zero := make([]byte, blockSize)
	for off := int64(0); off < info.Size(); off += span {
		n, err := in.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			return nil, err
		}
		runStart := -1 // the non-zero blocks in a row, written at once
		for b := 0; b*blockSize < n; b++ {
			block := buf[b*blockSize : min64(int64(b+1)*blockSize, int64(n))]
			if bytes.Equal(block, zero[:len(block)]) {
				if runStart >= 0 {
					if _, err := out.WriteAt(buf[runStart*blockSize:b*blockSize], off+int64(runStart)*blockSize); err != nil {
						return nil, err
					}
					runStart = -1
				}
				continue
			}
			if runStart < 0 {
				runStart = b
			}
			if index := off/blockSize + int64(b); index < int64(len(sums)) {
				full := make([]byte, 0, blockSize)
				if len(block) < blockSize { // short at the file's end: zeros after it
					full = append(append(full, block...), zero[len(block):]...)
					block = full
				}
				sums[index] = maphash.Bytes(digestSeed, block) | 1 // never 0 for data
			}
		}
		if runStart >= 0 {
			if _, err := out.WriteAt(buf[runStart*blockSize:n], off+int64(runStart)*blockSize); err != nil {
				return nil, err
			}
		}
	}
	return sums, out.Truncate(size)
}

func min64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

func capacityOf(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes > 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

func (f *frontEnd) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/folder/") {
		f.serveFolder(w, r)
		return
	}
	if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/sdk") {
		f.next.ServeHTTP(w, r)
		return
	}
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	// The simulator panics fetching an unset property (a VM's `snapshot` before its first
	// one); vCenter answers with no value. (Fetch is not in vim25/types: matched as text.)
	if found := fetchSnapshot.FindSubmatch(body); found != nil {
		ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: string(found[1])}
		if vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine); ok && vm.Snapshot == nil {
			w.Header().Set("Content-Type", "text/xml; charset=utf-8")
			w.WriteHeader(http.StatusOK)
			fmt.Fprint(w, envelopeStart, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`,
				envelopeEnd)
			return
		}
	}
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	if err != nil {
		f.next.ServeHTTP(w, r)
		return
	}
	switch req := method.Body.(type) {
	case *types.QueryChangedDiskAreas:
		f.queryChangedDiskAreas(w, req)
		return
	case *types.CreateSnapshot_Task:
		// Quiescing needs VMware Tools in the guest; tests mark a VM without them.
		if vm, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachine); ok && req.Quiesce &&
			strings.Contains(vm.Config.Annotation, noToolsMark) {
			soapFault(w, "VMware Tools is not running in the guest: cannot quiesce", "ToolsUnavailable")
			return
		}
		rec := &recorder{header: http.Header{}, status: http.StatusOK}
		f.next.ServeHTTP(rec, r)
		if rec.status == http.StatusOK {
			if err := f.freeze(req.This); err != nil {
				soapFault(w, "freezing the snapshot's disks: "+err.Error(), "SystemError")
				return
			}
		}
		rec.replay(w)
		return
	case *types.RemoveSnapshot_Task:
		var owner *types.ManagedObjectReference
		if snap, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachineSnapshot); ok {
			vm := snap.Vm
			owner = &vm
		}
		rec := &recorder{header: http.Header{}, status: http.StatusOK}
		f.next.ServeHTTP(rec, r)
		if rec.status == http.StatusOK {
			f.forget(req.This.Value)
			if owner != nil {
				entityIsTheVM(rec.body.Bytes(), *owner)
			}
		}
		rec.replay(w)
		return
	case *types.ReconfigVM_Task:
		f.next.ServeHTTP(w, r)
		if enabled := req.Spec.ChangeTrackingEnabled; enabled != nil && !*enabled {
			f.reset(req.This.Value)
		}
		return
	}
	f.next.ServeHTTP(w, r)
}

// serveFolder: a datastore's files, read-only, to a client with a live session.
func (f *frontEnd) serveFolder(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	cookie, err := r.Cookie(sessionCookie)
	if err != nil || !f.sessionIsLive(cookie.Value) {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	dir, ok := f.stores[r.URL.Query().Get("dsName")]
	if !ok {
		http.Error(w, "no such datastore", http.StatusNotFound)
		return
	}
	r.URL.Path = strings.TrimPrefix(r.URL.Path, "/folder")
	if f.traceFolder {
		log.Printf("folder %s %s range=%q", r.Method, r.URL.Path, r.Header.Get("Range"))
	}
	http.FileServer(http.Dir(dir)).ServeHTTP(w, r)
}

// sessionIsLive asks the simulator, with the cookie, for its time: a session it expired
// or logged out gets NotAuthenticated. A confirmation holds for half a second.
func (f *frontEnd) sessionIsLive(cookie string) bool {
	f.mu.Lock()
	seen, ok := f.live[cookie]
	f.mu.Unlock()
	if ok && time.Since(seen) < 500*time.Millisecond {
		return true
	}
	body := envelopeStart + `<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">` +
		`ServiceInstance</_this></CurrentTime>` + envelopeEnd
	req, err := http.NewRequest(http.MethodPost, "/sdk", strings.NewReader(body))
	if err != nil {
		return false
	}
	req.AddCookie(&http.Cookie{Name: sessionCookie, Value: cookie})
	req.Header.Set("Content-Type", "text/xml; charset=utf-8")
	rec := &recorder{header: http.Header{}, status: http.StatusOK}
	f.next.ServeHTTP(rec, req)
	f.mu.Lock()
	defer f.mu.Unlock()
	if rec.status != http.StatusOK {
		delete(f.live, cookie)
		return false
	}
	f.live[cookie] = time.Now()
	return true
}

func (f *frontEnd) reset(vm string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for key := range f.disks {
		if strings.HasPrefix(key, vm+":") {
			delete(f.disks, key) // the next snapshot starts a new epoch
		}
	}
}

func (f *frontEnd) forget(snapshot string) {
	f.mu.Lock()
	files := f.frozen[snapshot]
	delete(f.frozen, snapshot)
	f.mu.Unlock()
	for _, path := range files {
		_ = os.Remove(path)
	}
}

// freeze gives the VM's newest snapshot disk files of its own and change ids.
func (f *frontEnd) freeze(ref types.ManagedObjectReference) error {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok || vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
		return fmt.Errorf("no snapshot on %s", ref.Value)
	}
	snap := simulator.Map.Get(*vm.Snapshot.CurrentSnapshot).(*simulator.VirtualMachineSnapshot)
	tracking := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	devices := make([]types.BaseVirtualDevice, 0, len(snap.Config.Hardware.Device))
	var files []string
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, device := range snap.Config.Hardware.Device {
		disk, isDisk := device.(*types.VirtualDisk)
		if !isDisk {
			devices = append(devices, device)
			continue
		}
		live, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			devices = append(devices, device)
			continue
		}
		src, err := f.flatPath(live.FileName)
		if err != nil {
			return err
		}
		name := strings.TrimSuffix(live.FileName, ".vmdk") + "-" + snap.Self.Value + ".vmdk"
		dst, _ := f.flatPath(name)
		sums, err := freezeFile(src, dst, capacityOf(disk))
		if err != nil {
			return err
		}
		files = append(files, dst)
		frozenDisk := *disk
		backing := *live
		backing.FileName = name
		if tracking {
			key := fmt.Sprintf("%s:%d", ref.Value, disk.Key)
			track := f.disks[key]
			if track == nil {
				track = &diskTrack{epoch: newEpoch(), states: map[string][]uint64{}}
				f.disks[key] = track
			}
			track.seq++
			id := fmt.Sprintf("52 %s/%d", track.epoch, track.seq)
			track.states[id] = sums
			backing.ChangeId = id
			live.ChangeId = id // the VM's disk now carries the newest id too
		}
		frozenDisk.Backing = &backing
		devices = append(devices, &frozenDisk)
	}
	f.frozen[snap.Self.Value] = files
	config := snap.Config
	hardware := config.Hardware
	hardware.Device = devices
	config.Hardware = hardware
	snap.Config = config
	return nil
}

func (f *frontEnd) queryChangedDiskAreas(w http.ResponseWriter, req *types.QueryChangedDiskAreas) {
	if req.Snapshot == nil {
		soapFault(w, "a snapshot is required", "InvalidArgument")
		return
	}
	snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
	if !ok {
		soapFault(w, "snapshot not found", "ManagedObjectNotFound")
		return
	}
	var disk *types.VirtualDisk
	for _, device := range snap.Config.Hardware.Device {
		if d, ok := device.(*types.VirtualDisk); ok && d.Key == req.DeviceKey {
			disk = d
		}
	}
	if disk == nil {
		soapFault(w, fmt.Sprintf("no disk %d in the snapshot", req.DeviceKey), "InvalidArgument")
		return
	}
	backing := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	f.mu.Lock()
	track := f.disks[fmt.Sprintf("%s:%d", req.This.Value, req.DeviceKey)]
	var now, since []uint64
	if track != nil {
		now = track.states[backing.ChangeId]
		if req.ChangeId != "*" {
			since = track.states[req.ChangeId]
		}
	}
	f.mu.Unlock()
	if now == nil {
		soapFault(w, "change tracking is not active for this disk at this snapshot", "FileFault")
		return
	}
	if req.ChangeId != "*" && since == nil {
		soapFault(w, fmt.Sprintf("change id %q is not valid", req.ChangeId), "InvalidArgument")
		return
	}
	capacity := capacityOf(disk)
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		soapFault(w, "startOffset beyond the disk", "InvalidArgument")
		return
	}
	length := capacity - req.StartOffset
	if length > pageSpan {
		length = pageSpan
	}
	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length}
	first, last := req.StartOffset/blockSize, (req.StartOffset+length-1)/blockSize
	for b := first; b <= last && b < int64(len(now)); b++ {
		changed := now[b] != 0
		if since != nil {
			old := uint64(0)
			if b < int64(len(since)) {
				old = since[b]
			}
			changed = now[b] != old
		}
		if !changed {
			continue
		}
		start := b * blockSize
		areas := info.ChangedArea
		if n := len(areas); n > 0 && areas[n-1].Start+areas[n-1].Length == start {
			areas[n-1].Length += blockSize
		} else {
			info.ChangedArea = append(areas, types.DiskChangeExtent{Start: start, Length: blockSize})
		}
	}
	if n := len(info.ChangedArea); n > 0 {
		tail := &info.ChangedArea[n-1]
		if end := req.StartOffset + length; tail.Start+tail.Length > end {
			tail.Length = end - tail.Start
		}
	}
	soapResponse(w, "QueryChangedDiskAreasResponse", info)
}

type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(status int)      { r.status = status }
func (r *recorder) replay(w http.ResponseWriter) {
	for k, v := range r.header {
		w.Header()[k] = v
	}
	w.WriteHeader(r.status)
	_, _ = w.Write(r.body.Bytes())
}

const envelopeStart = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
const envelopeEnd = `</soapenv:Body></soapenv:Envelope>`

func soapResponse(w http.ResponseWriter, name string, value interface{}) {
	inner, err := xml.Marshal(struct {
		XMLName   xml.Name
		Returnval interface{} `xml:"returnval"`
	}{xml.Name{Space: "urn:vim25", Local: name}, value})
	if err != nil {
		soapFault(w, err.Error(), "SystemError")
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, envelopeStart, string(inner), envelopeEnd)
}

func soapFault(w http.ResponseWriter, message, kind string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	var escaped bytes.Buffer
	_ = xml.EscapeText(&escaped, []byte(message))
	fmt.Fprintf(w, `%s<soapenv:Fault><faultcode>ServerFaultCode</faultcode>`+
		`<faultstring>%s</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s">`+
		`</%sFault></detail></soapenv:Fault>%s`,
		envelopeStart, escaped.String(), kind, kind, kind, envelopeEnd)
}

var fetchSnapshot = regexp.MustCompile(
	`(?s)<Fetch[ >].*?<_this[^>]*>(vm-[^<]+)</_this>.*?<prop[^>]*>snapshot</prop>`)

var taskRef = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

// entityIsTheVM: vSphere's removeSnapshot task names the VM as its entity; the simulator
// names the snapshot, which pyvmomi refuses to read (not a ManagedEntity).
func entityIsTheVM(response []byte, vm types.ManagedObjectReference) {
	found := taskRef.FindSubmatch(response)
	if found == nil {
		return
	}
	ref := types.ManagedObjectReference{Type: "Task", Value: string(found[1])}
	task, ok := simulator.Map.Get(ref).(*simulator.Task)
	if !ok {
		return
	}
	simulator.Map.WithLock(task, func() {
		task.Info.Entity = &vm
		if owner, ok := simulator.Map.Get(vm).(*simulator.VirtualMachine); ok {
			task.Info.EntityName = owner.Name
		}
	})
}
