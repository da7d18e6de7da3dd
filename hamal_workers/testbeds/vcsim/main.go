// A vCenter simulator for Hamal's tests: govmomi's simulator (Debian's
// golang-github-vmware-govmomi-dev) served over TLS with a certificate the tests make,
// on 127.0.0.1. It prints one JSON line when it is ready: its SDK URL, and the
// directory that holds each datastore's files.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type ready struct {
	URL        string            `json:"url"`
	Datastores map[string]string `json:"datastores"`
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "PEM certificate (TLS when given)")
	keyFile := flag.String("key", "", "PEM key of the certificate")
	user := flag.String("user", "", "the only user accepted (any non-empty one when empty)")
	password := flag.String("password", "", "that user's password")
	vms := flag.Int("vm", 2, "VMs per host")
	idle := flag.Duration("session-idle", 0, "expire sessions idle this long (0: never)")
	diskMiB := flag.Int64("disk-mib", 64, "capacity of every VM's disk")
	traceFolder := flag.Bool("trace-folder", false, "log every datastore read and its range")
	flag.Parse()

	simulator.SessionIdleTimeout = *idle
	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 0
	model.Host = 1
	model.Machine = *vms
	model.Datastore = 1
	if err := model.Create(); err != nil {
		log.Fatalf("creating the model: %v", err)
	}
	defer model.Remove()
	for _, entity := range simulator.Map.All("VirtualMachine") {
		vm := entity.(*simulator.VirtualMachine)
		for _, device := range vm.Config.Hardware.Device {
			if disk, ok := device.(*types.VirtualDisk); ok {
				disk.CapacityInKB = *diskMiB * 1024
				disk.CapacityInBytes = *diskMiB * 1024 * 1024
			}
		}
	}

	model.Service.Listen = &url.URL{Host: *listen}
	if *user != "" {
		model.Service.Listen.User = url.UserPassword(*user, *password)
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("loading the certificate: %v", err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	server := model.Service.NewServer()
	defer server.Close()

	stores := map[string]string{}
	for _, entity := range simulator.Map.All("Datastore") {
		ds := entity.(*simulator.Datastore)
		stores[ds.Name] = ds.Info.GetDatastoreInfo().Url
	}
	// Before any request: CBT and frozen snapshots in front of the simulator (cbt.go).
	front := newFrontEnd(server.Config.Handler, stores)
	front.traceFolder = *traceFolder
	server.Config.Handler = front
	announce := *server.URL
	announce.User = nil // never print the password
	line, _ := json.Marshal(ready{URL: announce.String(), Datastores: stores})
	os.Stdout.Write(append(line, '\n'))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	time.Sleep(10 * time.Millisecond)
}
